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

Read back, the run's K models are one ensemble (``neurox predict`` and ``neurox evaluate`` of ``OUT``): each scores
every participant none of the folds saw, and their outputs are averaged in the target's units (a class's logits
as they are: every participant meets the same K models, so no fold's scale favours some participants over others;
several classes as probabilities; numbers in units, with the folds' brain-age gap lines averaged, which makes the
ensemble's corrected gap the mean of the folds' corrected gaps). The cross-validation's own participants are left
to ``OUT/metrics.json`` and ``OUT/predictions.tsv``: every fold but one trained or chose on each of them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from neurox.data.loader import Target, fold_participants, load_cohort, save_folds, save_splits
from neurox.data.store import Store, read_tsv
from neurox.train import distributed as dist_utils
from neurox.train.metrics import mean_over_folds
from neurox.train.runs import (
    add_gaps,
    check_model_store,
    cohort_with,
    load_run,
    participant_outputs,
    prediction_labels,
    prediction_outputs,
    prediction_rows,
    read_targets,
    shared_parts,
    write_predictions,
)


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

    rows, results, outputs, who, labels = [], {}, [], [], {}
    targets = None
    for fold in range(1, k + 1):
        run_dir = out / f"fold{fold}"
        fold_targets = read_targets(run_dir)
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
    """Per output, the centre and scale a fold's outputs are pooled on: for a class target (two classes) the
    standard deviation of the fold's outputs on its validation participants, and their mean where the fold's model
    was not recentred (``objectives.decision_thresholds``: a run made before neurox recentred, whose decision at 0
    can be far off); 0 and 1 otherwise."""
    width = len(targets[0].classes) if targets[0].task == "multiclass" else len(targets)
    centre, scale = np.zeros(width), np.ones(width)
    if targets[0].task == "multiclass" or not val_rows:
        return centre, scale
    values = np.stack([prediction_outputs(targets, r) for r in val_rows])
    for i, t in enumerate(targets):
        if t.task == "binary" and values[:, i].std() > 0:
            centre[i], scale[i] = values[:, i].mean() if t.threshold is None else 0.0, values[:, i].std()
    return centre, scale


def _in_units(targets: list[Target]) -> list[Target]:
    """The targets with regression values in their own units (each fold standardised by its own training
    participants; pooled outputs are compared in units)."""
    return [dataclasses.replace(t, mean=0.0, std=1.0, gap_fit=None) for t in targets]


def is_cross_validated(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` is the folder of ``finetune --folds``, a run per fold, rather than one run."""
    run_dir = Path(run_dir)
    return (run_dir / "folds.tsv").is_file() and not (run_dir / "model").exists()


def fold_models(run_dir: Path, fold_of: dict[str, int] | None = None) -> list[Path]:
    """Every fold's run of a cross-validated run (``fold_of``: its ``tested_by``, when already read); one line naming
    the first that has no model yet."""
    runs = [run_dir / f"fold{k}" for k in range(1, max((fold_of or tested_by(run_dir)).values()) + 1)]
    for run in runs:
        if not (run / "model" / "config.json").is_file():
            raise FileNotFoundError(f"{run}: this fold has no model yet; finish the cross-validation with neurox "
                                    f"finetune ... --out {run_dir} --folds {len(runs)} --resume true")
    return runs


def tested_by(run_dir: Path) -> dict[str, int]:
    """The fold that tested each participant of a cross-validated run (its ``folds.tsv``)."""
    return {r["participant_id"]: int(r["fold"]) for r in read_tsv(run_dir / "folds.tsv")}


def output_scale(run: Path) -> np.ndarray:
    """Per output of one fold's model, the factor that puts it on the scale the folds' outputs are pooled on
    (``pool_folds``): for a class target (two classes) 1 over the standard deviation of the fold's outputs on its
    validation participants, for a number its standard deviation (into its units), for several classes 1."""
    targets = read_targets(run)
    _, scale = _validation_scale(targets, [r for r in read_tsv(run / "predictions.tsv") if r["split"] == "val"])
    factor = 1 / scale
    for i, t in enumerate(targets if targets[0].task != "multiclass" else []):
        if t.task == "regression":
            factor[i] = t.std
    return factor


def scoring_models(run_dir: Path, store: Store) -> tuple[list, dict[str, str], dict, dict[str, int]]:
    """The run's targets and split, its models (key -> model, factor per output), and which participant each model
    scores (``neurox explain``): a run's own model (key 0, no factor) all of them; a cross-validated run's fold models
    (key k) each the participants its fold tested (``fold_of``), so that every participant is scored out of fold, with
    the factor that puts its outputs (and attributions) on the scale the folds' outputs are pooled on
    (``output_scale``)."""
    from neurox.hub import load_pretrained

    if not is_cross_validated(run_dir):
        _, targets, splits = load_run(run_dir)
        model = load_pretrained(run_dir / "model")
        check_model_store(model, store)
        return targets, splits, {0: (model, None)}, {}
    fold_of = tested_by(run_dir)
    runs = fold_models(run_dir, fold_of)
    models = {}
    for k, run in enumerate(runs, start=1):
        models[k] = (load_pretrained(run / "model"), output_scale(run))
        check_model_store(models[k][0], store, announce=k == 1)
    return read_targets(runs[0]), dict.fromkeys(fold_of, "test"), models, fold_of


def ensemble_targets(runs: list[Path]) -> list[Target]:
    """The targets the ensemble of the fold runs ``runs`` (``fold_models``) gives outputs in: regression in its
    units, with the folds' gap lines averaged (where every fold has one)."""
    per_fold = [read_targets(run) for run in runs]
    targets = _in_units(per_fold[0])
    for i, t in enumerate(targets):
        lines = [fold[i].gap_fit for fold in per_fold]
        if t.task == "regression" and all(lines):
            t.gap_fit = [float(v) for v in np.mean(lines, axis=0)]
    return targets


def ensemble_outputs(runs: list[Path], store: Store, cohort, participants: list[str], env: dist_utils.Env,
                     batch_size: int, out: Path | None, command: str, progress: bool) -> tuple[list[str], np.ndarray]:
    """Each participant's mean output from every fold's model in turn, in the ensemble's units (``ensemble_targets``),
    averaged over the models: one row per participant that every model could read. With ``out``, each model's
    participant outputs are kept beside it (``kept_parts``, a folder per fold) until it is written, so that an
    interrupted run resumes."""
    from neurox.hub import load_pretrained, weights_digest
    from neurox.io.claim import resolved
    from neurox.train.metrics import aggregate

    kept = shared_parts(out, {"models": [weights_digest(run / "model") for run in runs],
                              "store": resolved(store.root)}, env) if out else None
    scored = []
    for k, run in enumerate(runs, start=1):
        model = load_pretrained(run / "model")
        check_model_store(model, store, announce=env.is_main and k == 1)
        targets = read_targets(run)
        cache = kept / f"fold{k}" if kept else None
        if cache and env.is_main:
            cache.mkdir(exist_ok=True)
        who, outputs = participant_outputs(model.to(env.device), store, cohort, participants, env, batch_size, cache,
                                           f"{command}, model {k} of {len(runs)}", progress)
        subjects, means = aggregate(who, outputs)
        scored.append(dict(zip(subjects, _comparable(targets, means))))
        del model
    common = sorted(set.intersection(*(set(s) for s in scored)))
    combined = np.mean([[s[p] for p in common] for s in scored], axis=0).reshape(len(common), -1)
    if targets[0].task == "multiclass":  # the mean probabilities, as logits whose softmax gives them back
        combined = np.log(np.clip(combined, 1e-12, None))
    return common, combined


def evaluate_ensemble(run_dir: Path, store_path, batch_size: int = 4, n_boot: int = 1000, progress: bool = True,
                      out: str | Path | None = None, keep: dict | None = None) -> dict:
    """``neurox evaluate`` of a cross-validated run: the ensemble's metrics on the store's participants that none
    of the folds saw (split ``external``); as ``runs.evaluate`` otherwise."""
    from neurox.data.confounds import participant_motion
    from neurox.train.objectives import in_units, subject_metrics

    runs, targets, store, env, cohort, _ = _ensemble_cohort(run_dir, store_path, "evaluate", require_values=True)
    who, outputs = ensemble_outputs(runs, store, cohort, cohort.in_split("external"), env, batch_size,
                                    out and Path(out), "evaluate external", progress)
    labels = {p: cohort.labels(p) for p in who}
    metrics, subjects, subject_outputs = subject_metrics(targets, who, outputs, labels, n_boot,
                                                         motion=participant_motion(store))
    if keep is not None:
        keep["external"] = in_units(targets, subjects, subject_outputs, labels)
    return {"external": metrics}  # the caller discards what was kept beside ``out`` once it is written


def predict_ensemble(run_dir: Path, store_path, out: Path, batch_size: int = 4, progress: bool = True) -> Path:
    """``neurox predict`` of a cross-validated run: one row per participant of the store that none of the folds
    saw, from the ensemble of the folds' models."""
    from neurox.data.confounds import participant_motion
    from neurox.io.claim import discard_parts

    runs, targets, store, env, cohort, truth = _ensemble_cohort(run_dir, store_path, "predict", require_values=False)
    who, outputs = ensemble_outputs(runs, store, cohort, cohort.in_split("external"), env, batch_size, out,
                                    "predict", progress)
    rows = prediction_rows(targets, truth, "external", who, outputs)
    add_gaps(targets, rows)  # the folds' averaged line; none is fitted here
    if env.is_main:
        write_predictions(out, targets, rows, participant_motion(store), cohort.person)
        discard_parts(out)
    return out


def _ensemble_cohort(run_dir: Path, store_path, command: str, require_values: bool):
    """The fold runs, the ensemble's targets, the store, the processes, and the store's participants under the run's
    encoding, those of the cross-validation in split ``cv`` and the rest ``external``; one line saying how many of
    each, and an error where none is left to score."""
    fold_of = tested_by(run_dir)
    runs = fold_models(run_dir, fold_of)
    targets = ensemble_targets(runs)
    store = Store(store_path)
    env = dist_utils.detect("auto")  # the accelerator when there is one, else the CPU
    cohort, truth = cohort_with(store, targets, dict.fromkeys(fold_of, "cv"), require_values=require_values)
    seen = len(cohort.in_split("cv"))
    if not cohort.in_split("external"):
        columns = ", ".join(t.column for t in targets)
        whom = f"participant with a value of {columns}" if require_values else "participant"
        raise ValueError(f"{store.root}: every {whom} was in the cross-validation of {run_dir}, so its models saw them "
                         f"all; their out-of-fold results are {run_dir / 'metrics.json'} and "
                         f"{run_dir / 'predictions.tsv'}")
    if env.is_main:
        if require_values:
            cohort.say_left_out(command, "empty, n/a, or not a class the model learned")
        if seen:
            print(f"{command}: {seen} participants of the cross-validation left out (their out-of-fold results are "
                  f"{run_dir / 'predictions.tsv'}); {len(cohort.in_split('external'))} scored by the "
                  f"{len(runs)} folds' models together", file=sys.stderr)
    return runs, targets, store, env, cohort, truth


def _comparable(targets: list[Target], outputs: np.ndarray) -> np.ndarray:
    """One fold's participant outputs on the scale the folds share: logits of a class, numbers in their units,
    several classes as probabilities."""
    if targets[0].task == "multiclass":
        shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    units = np.array(outputs, dtype=np.float64)
    for i, t in enumerate(targets):
        if t.task == "regression":
            units[:, i] = units[:, i] * t.std + t.mean
    return units
