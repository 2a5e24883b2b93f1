"""``neurox finetune --folds K``: k-fold cross-validation of the fine-tuned model.

The participants are dealt into K folds as for the linear models (``neurox.data.loader.fold_participants``: a
participant's sessions, and with ``--split_by`` a family or a site, in one fold; classes spread evenly). Fold k's
run, ``OUT/fold{k}``, is an ordinary fine-tuning run (its own checkpoints, model, metrics and predictions) that tests
on fold k, chooses its best model on the next fold, and trains on the other K - 2. ``OUT/metrics.json`` then holds
``cv``, the test outputs of every fold's best model pooled (every participant tested once, by a model that never
trained on them or chose by them), with bootstrap intervals, permutation p-values and the motion check;
``cv_mean``, each metric's mean over the folds with its standard deviation (``_sd``); and ``cv_fold{k}``, each
fold's test metrics; ``OUT/predictions.tsv`` every participant's test row with its ``fold``.

Separately trained networks do not share a scale: one fold's logits can all sit above another's, and pooled as
they are, a model that ranks its own fold perfectly can rank the pool poorly (on the demo cohort, five folds of
AUROC 0.92-1.00 pooled to 0.80). Before pooling, each fold's logits for a class target are centred and scaled by
that fold's outputs on its validation participants (no labels are read, and a fold's own order is kept; the same
pool scored 0.97). Numbers are pooled in their units, several classes as probabilities.
With ``--resume true`` finished folds are kept, an interrupted one continues from its checkpoint, and the rest run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from neurox.data.loader import Target, fold_participants, load_cohort, save_folds, save_splits
from neurox.data.store import Store, read_tsv
from neurox.train import distributed as dist_utils
from neurox.train.metrics import mean_over_folds
from neurox.train.runs import prediction_labels, prediction_outputs


def finetune_folds(config, env: dist_utils.Env) -> Path:
    """Every fold's run in turn (``_finetune`` of ``neurox.train.finetune``), then the pooled metrics."""
    from neurox.io.claim import claim_folder
    from neurox.train.engine import checkpoint_exists
    from neurox.train.finetune import _finetune

    if config.folds < 3:
        raise ValueError(f"--folds {config.folds}: fine-tuning needs 3 folds or more (one tests, the next chooses "
                         "the best model, the rest train)")
    out = Path(config.out)
    claim_folder(out, "finetune", {"folds": config.folds})
    store = Store(config.store)
    cohort = load_cohort(store, config.targets, config.tasks, config.split_by, config.where)
    folds = fold_participants(cohort, config.seed, config.folds, say=env.is_main)
    if env.is_main:
        save_folds(out / "folds.tsv", folds)
    for fold in range(1, config.folds + 1):
        run_dir = out / f"fold{fold}"
        if (run_dir / "metrics.json").is_file() and config.resume:
            continue  # finished: its model chose and scored already
        if env.is_main and not (run_dir / "splits.tsv").is_file():  # the run reads its split from there
            run_dir.mkdir(parents=True, exist_ok=True)
            later = fold % config.folds + 1
            save_splits(run_dir / "splits.tsv", {p: "test" if f == fold else "val" if f == later else "train"
                                                 for p, f in folds.items()})
        dist_utils.barrier()
        if env.is_main:
            print(f"finetune: fold {fold} of {config.folds} into {run_dir}", flush=True)
        resume = config.resume and checkpoint_exists(run_dir)  # a fold not yet begun starts as a new run
        _finetune(dataclasses.replace(config, out=str(run_dir), folds=None, resume=resume), env)
    if env.is_main:
        pool_folds(out, config.folds, config.n_boot, store)
    dist_utils.barrier()
    return out


def pool_folds(out: Path, k: int, n_boot: int, store: Store) -> dict:
    """``metrics.json`` and ``predictions.tsv`` of ``out`` from its fold runs' test predictions."""
    from neurox.data.confounds import participant_motion
    from neurox.train.engine import write_json
    from neurox.train.objectives import subject_metrics
    from neurox.train.runs import write_predictions

    rows, results, outputs, who, labels = [], {}, [], [], {}
    targets = None
    for fold in range(1, k + 1):
        run_dir = out / f"fold{fold}"
        fold_targets = [Target(**t) for t in json.loads((run_dir / "targets.json").read_text())["targets"]]
        targets = targets or _in_units(fold_targets)
        tested = json.loads((run_dir / "metrics.json").read_text()).get("test", {})
        # the motion check is the pooled one's: a check per fold of a few dozen participants would warn by chance
        results[f"cv_fold{fold}"] = {k: v for k, v in tested.items() if not k.endswith("mean_fd_r")}
        predicted = read_tsv(run_dir / "predictions.tsv")
        centre, scale = _validation_scale(fold_targets, [r for r in predicted if r["split"] == "val"])
        for r in (r for r in predicted if r["split"] == "test"):
            rows.append({**r, "split": "cv", "fold": fold})
            outputs.append((prediction_outputs(fold_targets, r) - centre) / scale)
            who.append(r["participant_id"])
            labels[r["participant_id"]] = np.array(prediction_labels(fold_targets, r), dtype=np.float32)
    motion = participant_motion(store)
    pooled = subject_metrics(targets, who, np.stack(outputs), labels, n_boot, motion=motion)[0]
    results = {"cv": pooled, "cv_mean": mean_over_folds(list(results.values())), **results}
    write_json(out / "metrics.json", results)
    write_predictions(out / "predictions.tsv", targets, rows)
    return results


def _validation_scale(targets: list[Target], val_rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per output, the centre and scale a fold's outputs are pooled on: for a class target (two classes) the mean
    and standard deviation of the fold's outputs on its validation participants; 0 and 1 otherwise."""
    width = len(targets[0].classes) if targets[0].task == "multiclass" else len(targets)
    centre, scale = np.zeros(width), np.ones(width)
    if targets[0].task == "multiclass" or not val_rows:
        return centre, scale
    values = np.stack([prediction_outputs(targets, r) for r in val_rows])
    for i, t in enumerate(targets):
        if t.task == "binary" and values[:, i].std() > 0:
            centre[i], scale[i] = values[:, i].mean(), values[:, i].std()
    return centre, scale


def _in_units(targets: list[Target]) -> list[Target]:
    """The targets with regression values in their own units (each fold standardised by its own training
    participants; pooled outputs are compared in units)."""
    return [dataclasses.replace(t, mean=0.0, std=1.0, gap_fit=None) for t in targets]
