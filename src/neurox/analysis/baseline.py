"""``neurox baseline``: functional connectivity + a linear model, on the same split as the model.

Per participant, the Fisher-z correlation matrix of the atlas' parcel series (mean over runs), or its
tangent-space projection (neurox.analysis.tangent); its upper triangle, standardised, goes into a
cross-validated logistic regression (classes) or ridge regression (numbers) fitted on the training
participants only; metrics are computed on the validation and test participants exactly as for the model
(subject level, bootstrap intervals). The fitted coefficients are saved as plain arrays, so
``evaluate_baseline`` scores any store.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from neurox.analysis.connectivity import (
    KINDS,
    participant_matrices,
    series_cache,
    store_atlas,
    upper_triangle,
)
from neurox.analysis.covariates import Adjustment
from neurox.analysis.matrix_table import MatrixTable
from neurox.data.confounds import Denoising, participant_motion
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
from neurox.io.atomic import write_atomic, write_text_atomic
from neurox.io.claim import claim_folder, resolved
from neurox.train.objectives import decision_thresholds, subject_metrics
from neurox.train.runs import add_gaps, cohort_with, prediction_rows, read_targets, write_predictions

MODEL_FILE = "baseline.npz"


@dataclasses.dataclass
class BaselineConfig:
    store: str = ""  # the store (from neurox prepare)
    target: str = ""  # a column, or several separated by commas (one linear model each)
    out: str = ""  # the run directory to write
    atlas: str = ""  # label NIfTI in MNI space
    names: str | None = None  # the parcels' names table (index, name, network) for patterns.tsv; default: the atlas'
    task: str | None = None  # per target, comma-separated: binary, multiclass, regression (default: inferred)
    split_from: str | None = None  # a finetune run directory whose splits.tsv to use
    seed: int = 0  # the split's seed when there is no --split_from, and the fit's
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, validation, test participants
    split_by: str | None = None  # a phenotype column (family ID, site) whose members share one side of the split
    folds: int | None = None  # k-fold cross-validation instead of one split; the saved model is fitted on everyone
    covariates: list[str] | None = None  # columns (and mean_fd) regressed out of the features, fitted on training
    harmonize: str | None = None  # a site or scanner column: ComBat across its values, fitted on training
    where: str | None = None  # COLUMN=VALUE: only these participants (controls, for a normative model)
    kind: str = "fisher_z"  # the features: fisher_z, plain, partial correlation, or tangent (the tangent space)
    n_boot: int = 1000  # bootstrap resamples of the participants for the 95% intervals
    confounds: str = "none"  # denoising of each run's parcel series: none, simple, scrubbing or compcor
    fd_threshold: float = 0.5  # mm of framewise displacement above which scrubbing drops a frame
    global_signal: bool = False  # regress the global signal too
    workers: int = 1  # processes reading the runs' frames for the connectivity features (and the tangent passes)


def _features(store: Store, atlas: tuple[np.ndarray, list[int]], participants: list[str], kind: str,
              progress: bool, denoising: Denoising, cache: Path | None = None, workers: int = 1,
              reference: np.ndarray | None = None, train: list[str] | None = None):
    """(participant, feature vector float32), one participant at a time in sorted order, from the atlas on the
    store grid (``store_atlas``); and (``kind`` tangent) the reference point: the one given (a fitted run's), else
    the geometric mean of the ``train`` participants' matrices, so that no validation or test participant shapes
    the features. No matrix is held beyond its participant's turn (the tangent space keeps them in a table in
    ``cache`` until the reference is known), so the caller decides which features to keep."""
    atlas_grid, labels = atlas
    runs, _ = prepared_runs(store, participants)
    matrices = participant_matrices(store, atlas_grid, labels, runs, kind, progress, denoising, cache,
                                    workers=workers)
    if kind != "tangent":
        return ((p, upper_triangle(m).astype(np.float32)) for p, m in matrices), None
    from neurox.analysis.tangent import tangent_matrix, tangent_table, whitening

    upper = np.triu_indices(len(labels))  # the diagonal too: a parcel's variance relative to the group's
    if reference is not None:  # a fitted run's: each participant projected as it comes
        to_tangent = whitening(reference)
        return ((p, tangent_matrix(m, to_tangent)[upper].astype(np.float32)) for p, m in matrices), reference
    if cache is None:
        raise ValueError("tangent features without a reference need a folder for the training matrices")
    table, order, training, train = MatrixTable(cache / "matrices", len(labels)), [], [], set(train or [])
    with table.appending() as add:
        for p, matrix in matrices:
            training += [len(order)] * (p in train)
            order.append(p)
            add(matrix)
    reference = tangent_table(table, training, workers, progress, "baseline")  # every matrix projected, in place
    return ((p, m[upper].astype(np.float32)) for p, m in zip(order, table)), reference


BLOCK_VALUES = 2**24  # float64 values (128 MB) of standardised features held at once by the wide fit


@dataclasses.dataclass
class LinearDesign:
    """Training rows as a linear fit sees them: standardised, and (more columns than rows) in their own basis,
    with the map of weights on that basis back to weights on the standardised columns. One design serves every
    target fitted on the same rows (``fit_linear(..., design=)``): for a cohort it is the costly part."""

    mean: np.ndarray
    scale: np.ndarray
    features: np.ndarray
    to_weights: Callable[[np.ndarray], np.ndarray] | None = None


def linear_design(x: np.ndarray) -> LinearDesign:
    from sklearn.preprocessing import StandardScaler

    if x.shape[1] > x.shape[0]:
        return _wide_basis(x)
    scaler = StandardScaler().fit(x.astype(np.float64))
    return LinearDesign(scaler.mean_, scaler.scale_, scaler.transform(x.astype(np.float64)))


def fit_linear(x: np.ndarray, y: np.ndarray, task: str, seed: int, design: LinearDesign | None = None):
    """Standardised features; LogisticRegressionCV or RidgeCV, cross-validated on these rows only. ``design``:
    ``linear_design(x)``, when several targets are fitted on the same ``x``.

    With more features than rows (connectivity edges of a cohort, a per-position embedding: thousands of
    features, fewer participants) the model is fitted in the rows' own basis, ``z = U S Vt`` -> ``z Vt.T = U S``
    (rows x rank), and its weights mapped back through ``Vt = S^-1 Ut z``: an L2-penalised linear model's weights
    lie in the span of its training rows (of any subset of them too, so the inner cross-validation fits the same
    models), and ``Vt`` is orthonormal, so at each strength the penalty and every output are the same, at a
    fraction of the cost. ``U`` and ``S`` come from the rows x rows Gram matrix ``z zt``, summed over blocks of
    standardised columns (``_wide_basis``), so memory is ``x`` (float32 is enough) plus rows x rows, never a
    float64 copy of ``x``. Where the inner folds score two strengths alike, the solvers' last digits can tip
    the choice to the neighbouring one (benchmarks/probe_fit.py measures both)."""
    design = design or linear_design(x)
    coef, intercept = _fit_penalised(design.features, y, task, seed)
    if design.to_weights is not None:
        coef = design.to_weights(coef)
    return {"mean": design.mean, "scale": design.scale, "coef": coef, "intercept": intercept}


def column_blocks(x: np.ndarray):
    """(slice, float64 block) of ``x``'s columns, ``BLOCK_VALUES`` values at a time."""
    width = max(1, BLOCK_VALUES // max(1, len(x)))
    for lo in range(0, x.shape[1], width):
        yield slice(lo, lo + width), x[:, lo : lo + width].astype(np.float64)


def _wide_basis(x: np.ndarray) -> LinearDesign:
    """The design of ``x`` with fewer rows than columns: the rows in their own basis ``U S`` (rows x rank)."""
    from sklearn.preprocessing import StandardScaler

    gram = np.zeros((len(x), len(x)))
    means, scales = [], []
    for _, block in column_blocks(x):  # StandardScaler per block: columns are standardised independently
        scaler = StandardScaler().fit(block)
        means.append(scaler.mean_)
        scales.append(scaler.scale_)
        z = scaler.transform(block)
        gram += z @ z.T
    mean, scale = np.concatenate(means), np.concatenate(scales)
    values, vectors = np.linalg.eigh(gram)  # ascending
    del gram
    # eigenvalues below the Gram matrix's rounding (the mean's null direction, at least) carry no row apart
    first = int(np.searchsorted(values, values[-1] * len(x) * np.finfo(np.float64).eps, side="right"))
    values = values[first:]
    on_basis = np.ascontiguousarray(vectors[:, first:] * np.sqrt(values))  # U S: the rows in their own basis
    del vectors
    if not len(values):  # every row alike once standardised: nothing to weigh, the fit is its intercept
        return LinearDesign(mean, scale, np.zeros((len(x), 1)), lambda coef: np.zeros((len(coef), x.shape[1])))

    def to_weights(coef: np.ndarray) -> np.ndarray:
        on_rows = (coef / values) @ on_basis.T  # Vt = S^-1 Ut z, so weights = (coef S^-2 (U S)t) z
        weights = np.empty((len(coef), x.shape[1]))
        for columns, block in column_blocks(x):  # one column block of z at a time
            weights[:, columns] = on_rows @ ((block - mean[columns]) / scale[columns])
        return weights

    return LinearDesign(mean, scale, on_basis, to_weights)


def _fit_penalised(z: np.ndarray, y: np.ndarray, task: str, seed: int):
    """(coef, intercept) of RidgeCV (regression) or LogisticRegressionCV on ``z``."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV

    if task == "regression":
        model = RidgeCV(alphas=np.logspace(-2, 5, 15)).fit(z, y)
        return model.coef_[None, :], np.atleast_1d(model.intercept_)
    counts = np.bincount(y.astype(int))
    smallest = int(counts[counts > 0].min())
    import warnings

    with warnings.catch_warnings():  # scikit-learn 1.8 announces a change of attribute names
        warnings.simplefilter("ignore", FutureWarning)
        if smallest < 2:  # a class of one participant: no fold split can cross-validate the strength
            model = LogisticRegression(max_iter=5000, random_state=seed).fit(z, y.astype(int))
        else:
            model = LogisticRegressionCV(Cs=10, cv=min(5, smallest), max_iter=5000,
                                         random_state=seed).fit(z, y.astype(int))
    return model.coef_, model.intercept_


def linear_outputs(params: dict, x: np.ndarray) -> np.ndarray:
    """The fitted model's outputs for rows ``x``, a block of rows at a time (no float64 copy of a cohort)."""
    rows = max(1, BLOCK_VALUES // max(1, x.shape[1]))
    return np.concatenate([((x[lo : lo + rows] - params["mean"]) / params["scale"]) @ params["coef"].T
                           + params["intercept"] for lo in range(0, max(len(x), 1), rows)])


def baseline(config: BaselineConfig, progress: bool = True) -> Path:
    if not (config.store and config.target and config.out and config.atlas):
        raise ValueError("baseline needs --store, --target, --atlas and --out")
    if config.kind not in KINDS:
        raise ValueError(f"--kind {config.kind}: choose {', '.join(KINDS)}")
    store = Store(config.store)
    claim_folder(config.out, "baseline", {k: resolved(v) if k in PATHS else v
                                          for k, v in dataclasses.asdict(config).items() if k in SETTINGS})
    columns = [c.strip() for c in config.target.split(",") if c.strip()]
    tasks = [t.strip() or None for t in config.task.split(",")] if config.task else None
    cohort = load_cohort(store, columns, tasks, None if config.split_from else config.split_by, config.where)
    cohort.say_left_out("baseline")
    cohort.say_targets("baseline")
    folds = None
    if config.folds and config.split_from:
        raise ValueError("baseline: --folds cross-validates on folds of its own; it takes no --split_from")
    if config.split_from:
        splits = load_splits(Path(config.split_from) / "splits.tsv")
        cohort.split = {p: splits[p] for p in cohort.participants if p in splits}
    elif config.folds:  # every participant trains the saved model; the folds say how well such a model predicts
        folds = fold_participants(cohort, config.seed, config.folds)
        cohort.split = dict.fromkeys(cohort.participants, "train")
    else:
        cohort.split = split_participants(cohort, config.seed, config.split_fractions)
    # after the split, which stays the same: participants without a value are left out
    adjustment = Adjustment.of(store, cohort, list(config.covariates or []), config.harmonize, "baseline")
    standardise(cohort)
    denoising = Denoising(config.confounds, config.fd_threshold, config.global_signal)
    atlas_grid, labels = store_atlas(store, config.atlas)
    cache = series_cache(config.out, atlas_grid)  # an interrupted baseline resumes from it

    def features_for(train: list[str]):
        return _features(store, (atlas_grid, labels), cohort.participants, config.kind, progress, denoising, cache,
                         config.workers, train=train)

    cv_results, cv_rows, features, reference = {}, [], None, None
    if folds:
        cv_results, cv_rows, features = _cross_validated(config, cohort, folds, features_for, adjustment,
                                                         participant_motion(store), progress)
    if features is None:
        features, reference = features_for(cohort.in_split("train"))
    wanted, x_train, train, held = set(cohort.in_split("train")), None, [], {}
    for p, vector in features:  # training rows straight into the fit's array; validation and test kept
        if p in wanted:
            if x_train is None:
                x_train = np.empty((len(wanted), len(vector)), np.float32)
            x_train[len(train)] = vector
            train.append(p)
        elif cohort.split.get(p) in ("val", "test"):
            held[p] = vector
    if not train:
        raise ValueError(f"{config.store}: no training participant of the split has a prepared run here "
                         f"({len(wanted)} in the split): nothing to fit the baseline on")
    x_train = x_train[: len(train)]  # fit_linear standardises it a block of columns at a time
    adjustment = adjustment.fit(train, x_train)
    y_train = np.stack([cohort.labels(p) for p in train])

    params, outputs_by_target = {}, []
    targets = cohort.targets
    if progress:  # minutes at cohort scale (docs/performance.md), with no finer step to show
        print(f"baseline: fitting {len(targets)} cross-validated linear model(s) on {len(train)} training "
              f"participants x {x_train.shape[1]} features", file=sys.stderr, flush=True)
    design = linear_design(x_train)  # one basis for every target
    for i, target in enumerate(targets):
        fitted = fit_linear(x_train, y_train[:, i], target.task, config.seed, design)
        params.update({f"{target.column}.{k}": v for k, v in fitted.items()})
        outputs_by_target.append(fitted)

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_patterns(out, config, targets, outputs_by_target, x_train, labels)
    motion = participant_motion(store)
    results, rows, scored = {}, [], {}
    for split in ("val", "test"):
        members = [p for p in cohort.in_split(split) if p in held]
        if members:
            x = np.stack([held.pop(p) for p in members])
            adjustment.apply(members, x)
            scored[split] = members, np.concatenate([linear_outputs(f, x) for f in outputs_by_target], axis=1)
    if "val" in scored:  # each class decision recentred on the validation participants, as fine-tuning does
        members, outputs = scored["val"]
        thresholds = decision_thresholds(targets, members, outputs, {p: cohort.labels(p) for p in members})
        for i, target in enumerate(targets):  # several classes: one target, an intercept per class
            moved = thresholds if target.task == "multiclass" else thresholds[i]
            if target.task != "regression":
                params[f"{target.column}.intercept"] = outputs_by_target[i]["intercept"] - moved
                target.threshold = moved.tolist() if target.task == "multiclass" else float(moved)
        scored = {split: (members, outputs - thresholds) for split, (members, outputs) in scored.items()}
    for split, (members, outputs) in scored.items():
        metrics, subjects, subject_outputs = subject_metrics(targets, members, outputs,
                                                             {p: cohort.labels(p) for p in members}, config.n_boot,
                                                             motion=motion)
        results[split] = metrics
        rows += prediction_rows(targets, cohort.values, split, subjects, subject_outputs)

    from neurox.train.engine import run_environment, write_json

    add_gaps(targets, rows)  # before targets.json, which keeps the gap correction for evaluate and predict
    results.update(cv_results)
    rows += cv_rows

    def save_arrays(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **params, atlas_labels=np.array(labels), **adjustment.arrays(),
                     **({"tangent_reference": reference} if reference is not None else {}))

    write_atomic(out / MODEL_FILE, save_arrays)
    write_json(out / "targets.json", {"targets": [t.to_dict() for t in targets],
                                      "participants_left_out": cohort.left_out})
    write_text_atomic(out / "config.yaml", yaml.safe_dump({**dataclasses.asdict(config),
                                                          "environment": run_environment(None, [store])},
                                                         sort_keys=False))
    save_splits(out / "splits.tsv", cohort.split)
    if folds:
        save_folds(out / "folds.tsv", folds)
    write_json(out / "metrics.json", results)
    write_predictions(out / "predictions.tsv", targets, rows, motion, cohort.person)
    shutil.rmtree(cache, ignore_errors=True)
    return out


def _cross_validated(config: BaselineConfig, cohort, folds: dict[str, int], features_for, adjustment, motion,
                     progress: bool):
    """The folds' metrics and out-of-fold prediction rows (neurox.analysis.crossval), and the features for the
    final fit on everyone when they do not depend on who trains (else None: the tangent space's are remade)."""
    from neurox.analysis.crossval import cross_validate

    kept = []  # made once, for every fold and the final fit

    def stacked(made: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
        return list(made), np.stack(list(made.values())) if made else np.empty((0, 0), np.float32)

    def fold_features(train: list[str]) -> tuple[list[str], np.ndarray]:
        if config.kind == "tangent":  # the reference point is the fold's training participants' mean
            return stacked(dict(features_for(train)[0]))
        if not kept:
            kept.extend(stacked(dict(features_for([])[0])))
        return kept[0], kept[1]

    results, rows = cross_validate(cohort, folds, fold_features, adjustment, config.seed, config.n_boot, motion,
                                   "baseline", progress)
    return results, rows, zip(*kept) if kept else None


def _write_patterns(out: Path, config: BaselineConfig, targets, fitted: list[dict], x_train: np.ndarray,
                    labels: list[int]) -> None:
    """patterns.tsv (and network_patterns.tsv): each edge's weights and activation patterns, from the training
    participants' features as the model saw them (neurox.analysis.patterns)."""
    from neurox.analysis.connectivity import atlas_names, atlas_networks
    from neurox.analysis.patterns import activation_patterns, write_patterns

    columns = [f"{t.column}_{c}" if t.task == "multiclass" else t.column for t in targets
               for c in (t.classes if t.task == "multiclass" else [None])]
    outputs = np.concatenate([linear_outputs(f, x_train) for f in fitted], axis=1)
    weights = np.concatenate([f["coef"] for f in fitted])
    write_patterns(out, columns, weights, activation_patterns(x_train, outputs), labels,
                   atlas_names(config.atlas, labels, config.names), atlas_networks(config.atlas, labels, config.names),
                   diagonal=config.kind == "tangent")


# what makes a baseline another experiment; n_boot, workers and the like only change how it is computed
SETTINGS = ("store", "target", "atlas", "names", "task", "split_from", "seed", "split_fractions", "split_by", "folds",
            "covariates", "harmonize", "where", "kind", "confounds", "fd_threshold", "global_signal")
PATHS = ("store", "atlas", "names", "split_from")


def evaluate_baseline(run_dir: str | Path, store_path: str | Path, n_boot: int = 1000, progress: bool = False,
                      keep: dict | None = None) -> dict:
    """A baseline run's metrics on a store, per split (unseen participants: ``external``); ``keep`` as for
    ``neurox.train.runs.evaluate``."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    targets = read_targets(run_dir)
    splits = load_splits(run_dir / "splits.tsv")
    stored = np.load(run_dir / MODEL_FILE)
    params = [{k: stored[f"{t.column}.{k}"] for k in ("mean", "scale", "coef", "intercept")} for t in targets]
    store = Store(store_path)
    cohort, _ = cohort_with(store, targets, splits)
    adjustment = Adjustment.load(stored, store, cohort, "evaluate")  # as the run adjusted its features, its fits
    denoising = Denoising(config.get("confounds", "none"), config.get("fd_threshold", 0.5),
                          config.get("global_signal", False))  # as the run was fitted
    atlas_grid, labels = store_atlas(store, config["atlas"])
    if list(stored["atlas_labels"]) != labels:
        raise ValueError(f"{store_path}: the atlas covers other parcels on this store's grid than in the baseline run")
    features, _ = _features(store, (atlas_grid, labels), cohort.participants, config["kind"], progress, denoising,
                            reference=stored["tangent_reference"] if config["kind"] == "tangent" else None)

    def score(p: str, vector: np.ndarray) -> np.ndarray:
        row = adjustment.apply([p], vector[None].copy())
        return np.concatenate([linear_outputs(f, row) for f in params], axis=1)[0]

    scores = {p: score(p, vector) for p, vector in features}  # each scored as it comes: no cohort of features held
    motion = participant_motion(store)
    results = {}
    for split in ("train", "val", "test", "external"):
        members = [p for p in cohort.in_split(split) if p in scores]
        if members:
            outputs = np.stack([scores[p] for p in members])
            labels = {p: cohort.labels(p) for p in members}
            results[split], subjects, subject_outputs = subject_metrics(targets, members, outputs, labels, n_boot,
                                                                        motion=motion)
            if keep is not None:
                from neurox.train.objectives import in_units

                keep[split] = in_units(targets, subjects, subject_outputs, labels)
    return results
