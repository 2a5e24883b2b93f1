"""k-fold cross-validation of the linear models of ``neurox baseline`` and ``neurox probe`` (``--folds K``).

With a few hundred participants one held-out split leaves a test set whose AUROC moves by 0.1 with the draw
(Varoquaux, NeuroImage 2018); cross-validation tests every participant once, by a model fitted on the other folds.
What each fold's model learns stays inside the fold: the features' standardisation, the penalty's inner
cross-validation, the site harmonisation, the covariate removal and (tangent space) the reference matrix are fitted
on its training participants only. Reported: ``cv``, the metrics of every participant's out-of-fold output pooled,
with bootstrap intervals, the head-motion check and permutation p-values over participants (each permutation
re-pairs the outputs with the labels, the models are not refitted: where the features hold nothing, out-of-fold
outputs lean slightly against the labels, so this p-value errs on the large side); ``cv_fold1`` ... the metrics of
each fold alone, without intervals or a motion check (a few dozen participants each: a check per fold would warn
by chance); and ``cv_mean``, each metric's mean over the folds and its standard deviation. The brain-age gap of a
fold is corrected with a line fitted on the other folds' participants.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import numpy as np

from neurox.analysis.baseline import fit_linear, linear_design, linear_outputs
from neurox.analysis.covariates import Adjustment
from neurox.train.metrics import mean_over_folds
from neurox.train.objectives import subject_metrics

# the fold's training participants -> (participants, features: one row each); called once per fold, so features
# that depend on who trains (the tangent space's reference) are made per fold
FeaturesFor = Callable[[list[str]], tuple[list[str], np.ndarray]]


def cross_validate(cohort, folds: dict[str, int], features_for: FeaturesFor, adjustment: Adjustment, seed: int,
                   n_boot: int, motion: dict[str, float] | None, command: str, progress: bool = True
                   ) -> tuple[dict[str, dict], list[dict]]:
    """The metrics (``cv``: pooled out-of-fold; ``cv_fold{k}``: each fold's) and one prediction row per
    participant, out of fold, with its ``fold``. ``cohort``: a ``Cohort`` whose targets are standardised;
    ``adjustment``: harmonisation and covariates, fitted in each fold on its training participants."""
    from neurox.train.runs import add_gaps, prediction_rows

    targets, k = cohort.targets, max(folds.values())
    results, tested, outputs, fold_of = {}, [], [], []
    for fold in range(1, k + 1):
        train = [p for p in cohort.participants if folds.get(p) not in (None, fold)]
        participants, x = features_for(train)
        row = {p: i for i, p in enumerate(participants)}
        train = [p for p in train if p in row]
        test = [p for p in cohort.participants if folds.get(p) == fold and p in row]
        if not train or not test:
            raise ValueError(f"{command} --folds {k}: fold {fold} has {len(train)} training and {len(test)} test "
                             "participants with features; choose fewer folds")
        if progress:
            print(f"{command}: fold {fold} of {k}: fitting on {len(train)} participants, testing {len(test)}",
                  file=sys.stderr, flush=True)
        x_train, x_test = x[[row[p] for p in train]], x[[row[p] for p in test]]  # copies: adjusted in place
        adjustment.fit(train, x_train).apply(test, x_test)
        y_train = np.stack([cohort.labels(p) for p in train])
        design = linear_design(x_train)
        fitted = [fit_linear(x_train, y_train[:, i], t.task, seed, design) for i, t in enumerate(targets)]
        fold_outputs = np.concatenate([linear_outputs(f, x_test) for f in fitted], axis=1)
        labels = {p: cohort.labels(p) for p in test}
        alone, _, _ = subject_metrics(targets, test, fold_outputs, labels, 0)  # motion: pooled only, not per fold
        results[f"cv_fold{fold}"] = {k: v for k, v in alone.items() if not k.endswith(("_ci_low", "_ci_high"))}
        tested += test
        outputs.append(fold_outputs)
        fold_of += [fold] * len(test)
    pooled, subjects, subject_outputs = subject_metrics(targets, tested, np.concatenate(outputs),
                                                        {p: cohort.labels(p) for p in tested}, n_boot, motion=motion)
    rows = prediction_rows(targets, cohort.values, "cv", subjects, subject_outputs)
    fold_by = dict(zip(tested, fold_of))
    for r in rows:
        r["fold"] = fold_by[r["participant_id"]]
    for fold in range(1, k + 1):  # each fold's gap corrected by the other folds' line, never its own
        alone = [dataclasses.replace(t, gap_fit=None) for t in targets]
        add_gaps(alone, [r for r in rows if r["fold"] == fold], fit_on=[r for r in rows if r["fold"] != fold])
    for t in targets:  # for new participants (predict, evaluate): the line of every out-of-fold output
        t.gap_fit = None
    add_gaps(targets, [], fit_on=rows)
    return {"cv": pooled, "cv_mean": mean_over_folds(list(results.values())), **results}, rows
