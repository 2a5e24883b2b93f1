"""Subject-level metrics with bootstrap confidence intervals.

Windows are aggregated to one output per participant (the mean of window logits or outputs)
before any metric is computed; the interval is a percentile bootstrap over participants.
"""

from __future__ import annotations

import numpy as np

CLASSIFICATION = ("accuracy", "balanced_accuracy", "auroc")
REGRESSION = ("mae", "mse", "pearson_r", "r2")


def aggregate(participants: list[str], outputs: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Mean of window outputs per participant; participants sorted."""
    order = sorted(set(participants))
    index = {p: i for i, p in enumerate(order)}
    sums = np.zeros((len(order), outputs.shape[1]))
    counts = np.zeros(len(order))
    for p, out in zip(participants, outputs):
        sums[index[p]] += out
        counts[index[p]] += 1
    return order, sums / counts[:, None]


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula (ties get mid-ranks)."""
    from scipy.stats import rankdata

    labels = labels.astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((rankdata(scores)[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(labels: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    """labels: (n,) class indices; outputs: (n, 1) logits (binary) or (n, k) (multiclass)."""
    labels = labels.astype(int)
    if outputs.shape[1] == 1:
        predicted = (outputs[:, 0] > 0).astype(int)
        area = auroc(labels, outputs[:, 0])
        classes = [0, 1]
    else:
        predicted = outputs.argmax(1)
        classes = list(range(outputs.shape[1]))
        areas = [auroc(labels == k, outputs[:, k]) for k in classes]
        area = float(np.nanmean(areas)) if not all(np.isnan(areas)) else float("nan")
    recalls = [np.mean(predicted[labels == k] == k) for k in classes if (labels == k).any()]
    return {"accuracy": float(np.mean(predicted == labels)), "balanced_accuracy": float(np.mean(recalls)),
            "auroc": area}


def balanced_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score halfway between the two classes' median scores: where a model's decision goes so that neither
    class is favoured, whatever its training left its outputs' offset at (a few epochs, a rare class). Medians, so
    that one participant far out does not move it; 0 where a class has no participant."""
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        return 0.0
    return float((np.median(scores[labels]) + np.median(scores[~labels])) / 2)


def balanced_offsets(labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per class, what to subtract from a several-class model's logits (n, k) so that its argmax favours no class:
    the intercepts of a recalibration in which every class counts equally (each participant weighted by 1 / (k x
    their class's count)), i.e. the offsets at which that balanced population is given each class with mean
    probability 1/k. Cross-entropy on a cohort of unequal classes leaves the logits favouring the common ones, by
    about the log of each class's share; this takes that out, and whatever offset few epochs left. Mean 0 over
    the classes; zeros where a class has no participant."""
    labels = labels.astype(int)
    k = logits.shape[1]
    counts = np.bincount(labels, minlength=k)
    if (counts == 0).any():
        return np.zeros(k)
    logits = logits.astype(np.float64)
    weight = 1.0 / (k * counts[labels])  # sums to 1

    def loss_and_probabilities(b):
        shifted = logits - b
        top = shifted.max(1, keepdims=True)
        log_total = top[:, 0] + np.log(np.exp(shifted - top).sum(1))
        picked = shifted[np.arange(len(labels)), labels]
        return float(weight @ (log_total - picked)), np.exp(shifted - log_total[:, None])

    offsets = np.zeros(k)
    loss, p = loss_and_probabilities(offsets)
    for _ in range(100):  # Newton on a convex loss in k - 1 free offsets, halving the step until it falls
        gradient = 1.0 / k - weight @ p
        if np.abs(gradient).max() < 1e-10:
            break
        hessian = np.diag(weight @ p) - (p * weight[:, None]).T @ p
        step, size = np.linalg.pinv(hessian) @ gradient, 1.0
        while size > 1e-8:
            trial = offsets - size * step
            trial_loss, trial_p = loss_and_probabilities(trial)
            if trial_loss <= loss:
                offsets, loss, p = trial, trial_loss, trial_p
                break
            size /= 2
        else:
            break
    return offsets - offsets.mean()


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r, NaN where either side is constant."""
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def correlation_p(r: float, n: int) -> float:
    """Two-sided p-value of Pearson's r over n pairs (t test with n - 2 degrees of freedom)."""
    from scipy.stats import t as student

    if not np.isfinite(r) or n < 3:
        return float("nan")
    if abs(r) >= 1:
        return 0.0
    return float(2 * student.sf(abs(r) * np.sqrt((n - 2) / (1 - r * r)), n - 2))


MOTION_ALPHA = 0.05


def motion_warnings(splits: dict[str, dict], target: str | None = None) -> list[str]:
    """One line per target whose values (or whose model's outputs, more than the values) go with head motion
    in some split (p < 0.05), from the motion check's ``target_mean_fd_r`` and ``mean_fd_r``; ``target`` names
    the column where the metrics carry no prefix (one target)."""
    lines, warned = [], set()
    for split, metrics in splits.items():
        n = int(metrics.get("n_subjects") or 0)
        for key in [k for k in metrics if k.endswith("target_mean_fd_r")]:
            prefix = key[: -len("target_mean_fd_r")]
            name = prefix.rstrip(".") or target or "the target"
            r_target, r_output = metrics[key], metrics.get(f"{prefix}mean_fd_r", float("nan"))
            if name in warned:
                continue
            if correlation_p(r_target, n) < MOTION_ALPHA:
                lines.append(f"warning: {name} goes with head motion ({split}: r = {r_target:.2f} with mean FD over "
                             f"{n} participants, p = {correlation_p(r_target, n):.2g}); a model can score by reading "
                             "motion: check with denoised FC (--confounds scrubbing), the baseline beyond motion "
                             "(--covariates mean_fd) or motion-matched groups")
                warned.add(name)
            elif correlation_p(r_output, n) < MOTION_ALPHA and abs(r_output) > abs(r_target):
                lines.append(f"warning: the outputs for {name} follow head motion more than {name} does ({split}: "
                             f"r = {r_output:.2f} against {r_target:.2f} over {n} participants); check with denoised "
                             "FC (--confounds scrubbing) and the baseline beyond motion (--covariates mean_fd)")
                warned.add(name)
    return lines


def regression_metrics(values: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    errors = predictions - values
    total = ((values - values.mean()) ** 2).sum()
    r = pearson(values, predictions)
    return {"mae": float(np.abs(errors).mean()), "mse": float((errors**2).mean()), "pearson_r": r,
            "r2": float(1 - (errors**2).sum() / total) if total > 0 else float("nan")}


def target_metrics(task: str, labels: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    if task == "regression":
        return regression_metrics(labels, outputs[:, 0])
    return classification_metrics(labels, outputs)


def with_intervals(task: str, labels: np.ndarray, outputs: np.ndarray, n_boot: int = 1000,
                   seed: int = 0) -> dict[str, float]:
    """Point metrics plus ``<metric>_ci_low`` / ``<metric>_ci_high`` (95 % percentile bootstrap over
    participants) and ``n_subjects``."""
    point = target_metrics(task, labels, outputs)
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in point}
    n = len(labels)
    for _ in range(n_boot):
        pick = rng.integers(0, n, n)
        with np.errstate(all="ignore"):
            values = target_metrics(task, labels[pick], outputs[pick])
        for name, value in values.items():
            if np.isfinite(value):
                samples[name].append(value)
    result = {}
    for name, value in point.items():
        result[name] = value
        low, high = np.percentile(samples[name], [2.5, 97.5]) if samples[name] else (np.nan, np.nan)
        result[f"{name}_ci_low"], result[f"{name}_ci_high"] = float(low), float(high)
    if n_boot:
        result.update(permutation_p(task, labels, outputs, n_boot, seed))
    result["n_subjects"] = n
    return result


PERMUTATIONS_AT_ONCE = 2**22  # label values of permutations held at once


def permutation_p(task: str, labels: np.ndarray, outputs: np.ndarray, n_perm: int, seed: int = 0
                  ) -> dict[str, float]:
    """One-sided p-value that the outputs predict the labels better than chance, over ``n_perm`` permutations of
    the labels against the fixed outputs: ``auroc_p`` (classes; the macro AUROC for several) or ``pearson_r_p``
    (numbers): (1 + permutations scoring at least the observed) / (1 + n_perm). The outputs' ranks are computed
    once: a permutation only moves which of them are each class's, so every one costs a sum."""
    from scipy.stats import rankdata

    rng = np.random.default_rng([seed, 1])  # apart from the bootstrap's draws
    n = len(labels)
    chunk = max(1, PERMUTATIONS_AT_ONCE // max(n, 1))
    if task == "regression":
        y, x = labels - labels.mean(), outputs[:, 0] - outputs[:, 0].mean()
        if not (y.std() > 0 and x.std() > 0):
            return {"pearson_r_p": float("nan")}
        statistic = lambda permuted: permuted @ x  # noqa: E731 (r is this over a constant)
        observed, permute = y @ x, y
    else:
        labels = labels.astype(int)
        # each class's AUROC is its rank sum less a constant, over n_k (n - n_k): the class counts stay put
        ranks = {1: rankdata(outputs[:, 0])} if outputs.shape[1] == 1 else \
            {k: rankdata(outputs[:, k]) for k in range(outputs.shape[1])}
        present = [k for k in ranks if 0 < (labels == k).sum() < n]
        if not present:
            return {"auroc_p": float("nan")}

        def statistic(permuted: np.ndarray) -> np.ndarray:  # the (macro) AUROC, up to a constant
            return sum(((permuted == k) * ranks[k]).sum(-1) / ((labels == k).sum() * (n - (labels == k).sum()))
                       for k in present)

        observed, permute = statistic(labels), labels
    tolerance = 1e-9 * max(1.0, abs(float(observed)))
    above = 0
    for done in range(0, n_perm, chunk):
        batch = np.stack([rng.permutation(permute) for _ in range(min(chunk, n_perm - done))])
        above += int((statistic(batch) >= observed - tolerance).sum())
    return {"auroc_p" if task != "regression" else "pearson_r_p": (1 + above) / (1 + n_perm)}


def mean_over_folds(folds: list[dict]) -> dict:
    """Each metric's mean over the folds' test metrics, and its standard deviation across them (``_sd``)."""
    names = [k for k in folds[0] if not k.endswith(("_ci_low", "_ci_high", "_p")) and k != "n_subjects"
             and all(isinstance(f.get(k), (int, float)) for f in folds)]
    summary = {}
    for name in names:
        values = np.array([f[name] for f in folds], dtype=float)
        summary[name], summary[f"{name}_sd"] = float(np.nanmean(values)), float(np.nanstd(values))
    return summary


def paired_difference(task: str, labels: np.ndarray, first: np.ndarray, second: np.ndarray, n_boot: int = 1000,
                      seed: int = 0) -> dict[str, float]:
    """Each metric of ``first``'s outputs less the same metric of ``second``'s, on the same participants
    (``<metric>_diff``), with a 95% percentile interval and a two-sided p-value from one bootstrap over the
    participants, both models scored on each resample: the paired comparison that two intervals side by side
    are not (they overlap long after the difference is clear)."""
    point = {name: value - target_metrics(task, labels, second)[name]
             for name, value in target_metrics(task, labels, first).items()}
    rng = np.random.default_rng([seed, 2])
    samples = {name: [] for name in point}
    for _ in range(n_boot):
        pick = rng.integers(0, len(labels), len(labels))
        with np.errstate(all="ignore"):
            a, b = target_metrics(task, labels[pick], first[pick]), target_metrics(task, labels[pick], second[pick])
        for name in point:
            if np.isfinite(a[name] - b[name]):
                samples[name].append(a[name] - b[name])
    result = {}
    for name, value in point.items():
        drawn = np.array(samples[name])
        low, high = np.percentile(drawn, [2.5, 97.5]) if len(drawn) else (np.nan, np.nan)
        tail = min((1 + (drawn <= 0).sum()) / (1 + len(drawn)), (1 + (drawn >= 0).sum()) / (1 + len(drawn)))
        result.update({f"{name}_diff": value, f"{name}_diff_ci_low": float(low), f"{name}_diff_ci_high": float(high),
                       f"{name}_diff_p": float(min(1.0, 2 * tail)) if len(drawn) else float("nan")})
    return result

