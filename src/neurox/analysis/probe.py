"""``neurox probe``: how much of a target a frozen model's representation holds, in closed form.

The standard test of a self-supervised representation: each participant's embedding (the mean over
their windows of the backbone's pooled output, as ``neurox embed`` computes it; with ``pool="mean_std"``
also each feature's standard deviation over time; with ``pool="tokens"`` both per position; with
``stage`` an earlier stage's output instead of the last), a cross-validated logistic (classes) or ridge
(numbers) model fitted on the training participants only (the same fitting as the FC baseline),
metrics on the validation and test participants with bootstrap intervals. Pass ``--split_from RUN``
to use a finetune run's participants, so that a probe, a fine-tuned model and the FC baseline are
scored on the same people. ``neurox finetune --init DIR --freeze true`` is the gradient-trained
probe, for cohorts too large to embed at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from neurox.analysis.baseline import fit_linear, linear_design, linear_outputs
from neurox.analysis.covariates import Adjustment
from neurox.analysis.embed import POOLS, load_model, participant_vector, window_embeddings
from neurox.data.loader import (
    fold_participants,
    load_cohort,
    load_splits,
    prepared_runs,
    save_folds,
    save_splits,
    split_participants,
    standardise,
)
from neurox.data.store import Store
from neurox.hub import weights_digest
from neurox.io.atomic import write_text_atomic
from neurox.io.claim import claim_folder, resolved
from neurox.train.objectives import decision_thresholds, subject_metrics


def participant_embeddings(model, store: Store, participants: list[str], batch_size: int = 4,
                           pool: str = "mean", stage: int | None = None, progress: bool = False,
                           cache: Path | None = None) -> dict[str, np.ndarray]:
    """Each participant's embedding (``participant_vector`` of their windows, pooled by ``pool``), of
    the last stage's output or of ``stage``'s. ``cache``, a folder: each embedding is kept there as it is
    computed and read from there when present, so that an interrupted probe resumes where it stopped."""
    from neurox.io.npz import save_npy
    from neurox.progress import progress as progress_display

    runs, _ = prepared_runs(store, participants)
    out = {}
    for pid in progress_display(sorted(runs), desc="probe: embedding", unit="participant", disable=not progress):
        kept = cache / f"{pid}.npy" if cache is not None else None
        if kept is not None and kept.is_file():
            out[pid] = np.load(kept)
            continue
        _, series = window_embeddings(model, store, runs[pid], batch_size, progress=False, over_time=True,
                                      per_position=pool == "tokens", stage=stage)
        if len(series):
            out[pid] = participant_vector(series, pool)
            if kept is not None:
                save_npy(kept, out[pid])
    return out


def probe(model_path: str | Path, store_path: str | Path, target: str, out: str | Path | None = None,
          split_from: str | Path | None = None, seed: int = 0, pool: str = "mean", batch_size: int = 4,
          device: str = "auto", n_boot: int = 1000, stage: int | None = None, progress: bool = True,
          split_by: str | None = None, covariates: list[str] | None = None, where: str | None = None,
          folds: int | None = None, harmonize: str | None = None) -> dict:
    """Fit and score the probe; write ``metrics.json`` (and the split) to ``out`` when given. ``pool``:
    ``mean`` (the representation averaged over space and time), ``mean_std`` (and each feature's
    standard deviation over time) or ``tokens`` (both per position); see
    ``neurox.analysis.embed.participant_vector``. ``stage`` (1-based, default the last): probe that
    stage's output, before its patch merging (finer positions, fewer channels). ``split_by``: without
    ``split_from``, a column whose members (a family, a site) share one side of the split. ``covariates``:
    columns (and ``mean_fd``) regressed out of the embeddings, fitted on the training participants
    (``neurox.analysis.covariates``). ``where``: ``COLUMN=VALUE``, only these participants. ``folds``: k-fold
    cross-validation instead of one split (``neurox.analysis.crossval``): metrics ``cv`` and ``cv_fold1`` ...
    ``harmonize``: a site column, ComBat across its values fitted on the training participants
    (``neurox.analysis.harmonize``)."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
    from neurox.data.confounds import participant_motion
    from neurox.train.distributed import detect
    from neurox.train.runs import check_model_store

    if folds and split_from:
        raise ValueError("probe: --folds cross-validates on folds of its own; it takes no --split_from")
    model, _ = load_model(model_path)
    stages = model.config.num_stages
    if stage is not None and not 1 <= stage <= stages:
        raise ValueError(f"--stage {stage}: {model_path} has stages 1 to {stages}")
    store = Store(store_path)
    check_model_store(model, store)
    if out:
        claim_folder(out, "probe", {"model": weights_digest(model_path), "store": resolved(store.root),
                                    "target": target, "split_from": resolved(split_from), "seed": seed,
                                    "split_by": split_by, "folds": folds, "covariates": covariates,
                                    "harmonize": harmonize, "where": where, "pool": pool, "stage": stage or stages})
    columns = [c.strip() for c in target.split(",") if c.strip()]
    cohort = load_cohort(store, columns, split_by=None if split_from else split_by, where=where)
    cohort.say_left_out("probe")
    cohort.say_targets("probe")
    fold_of = None
    if split_from:
        splits = load_splits(Path(split_from) / "splits.tsv")
        cohort.split = {p: splits[p] for p in cohort.participants if p in splits}
    elif folds:
        fold_of = fold_participants(cohort, seed, folds)
        cohort.split = dict.fromkeys(cohort.participants, "train")
    else:
        cohort.split = split_participants(cohort, seed)
    adjustment = Adjustment.of(store, cohort, list(covariates or []), harmonize, "probe")
    standardise(cohort)
    model.to(detect(device).device).eval()
    # with --out, the embeddings are kept there until the metrics are written: an interrupted probe resumes (the
    # folder's claim guarantees the same model, store and pooling)
    cache = Path(out) / ".embeddings" if out else None
    features = participant_embeddings(model, store, cohort.participants, batch_size, pool, stage, progress, cache)
    motion = participant_motion(store)
    if fold_of:
        from neurox.analysis.crossval import cross_validate

        have = [p for p in cohort.participants if p in features]
        every = (have, np.stack([features[p] for p in have]) if have else np.empty((0, 0), np.float32))
        results, _ = cross_validate(cohort, fold_of, lambda train: every, adjustment, seed, n_boot, motion, "probe",
                                    progress)
        return _write(out, cohort, fold_of, cache, results, model_path, store, target, pool, stage or stages)
    train = [p for p in cohort.in_split("train") if p in features]
    x_train = np.stack([features[p] for p in train])
    adjustment = adjustment.fit(train, x_train)
    y_train = np.stack([cohort.labels(p) for p in train])
    design = linear_design(x_train)  # one basis for every target
    fitted = [fit_linear(x_train, y_train[:, i], t.task, seed, design) for i, t in enumerate(cohort.targets)]
    results, thresholds = {}, 0.0
    for split in ("val", "test"):  # val first: each class decision is recentred on it, as fine-tuning does
        members = [p for p in cohort.in_split(split) if p in features]
        if members:
            x = np.stack([features[p] for p in members])
            adjustment.apply(members, x)
            outputs = np.concatenate([linear_outputs(f, x) for f in fitted], axis=1)
            if split == "val":
                thresholds = decision_thresholds(cohort.targets, members, outputs,
                                                 {p: cohort.labels(p) for p in members})
            results[split], _, _ = subject_metrics(cohort.targets, members, outputs - thresholds,
                                                   {p: cohort.labels(p) for p in members}, n_boot,
                                                   motion=motion)
    return _write(out, cohort, None, cache, results, model_path, store, target, pool, stage or stages)


def _write(out, cohort, folds: dict[str, int] | None, cache: Path | None, results: dict, model_path, store: Store,
           target: str, pool: str, stage: int) -> dict:
    """With ``out``: the split (and folds), the metrics; the kept embeddings are no longer needed."""
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_splits(out / "splits.tsv", cohort.split)
        if folds:
            save_folds(out / "folds.tsv", folds)
        summary = {"model": str(model_path), "store": str(store.root), "target": target, "pool": pool,
                   "stage": stage, **results}
        write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(cache, ignore_errors=True)
    return results
