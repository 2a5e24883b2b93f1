"""Supervised objectives and subject-level evaluation of their outputs.

One head output column per binary or regression target (several targets train at once), or one
column per class for a single multiclass target. Losses are summed over targets.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from neurox.data.loader import Target
from neurox.train.metrics import aggregate, balanced_offsets, balanced_threshold, pearson, with_intervals


def num_outputs(targets: list[Target]) -> int:
    return targets[0].num_outputs if targets[0].task == "multiclass" else len(targets)


def head_task(targets: list[Target]) -> str | None:
    """The head's task as a model directory records it (None for a mix of binary and regression)."""
    tasks = {t.task for t in targets}
    if len(targets) == 1:
        return targets[0].task
    return "regression" if tasks == {"regression"} else "multilabel" if tasks == {"binary"} else None


def supervised_loss(outputs: torch.Tensor, labels: torch.Tensor, targets: list[Target]) -> torch.Tensor:
    outputs = outputs.float()
    if targets[0].task == "multiclass":
        return F.cross_entropy(outputs, labels[:, 0].long())
    losses = []
    for i, target in enumerate(targets):
        if target.task == "binary":
            losses.append(F.binary_cross_entropy_with_logits(outputs[:, i], labels[:, i]))
        else:
            losses.append(F.mse_loss(outputs[:, i], labels[:, i]))
    return torch.stack(losses).sum()


def subject_metrics(targets: list[Target], participants: list[str], outputs: np.ndarray,
                    labels: dict[str, np.ndarray], n_boot: int = 1000,
                    motion: dict[str, float] | None = None) -> tuple[dict, list[str], np.ndarray]:
    """Aggregate window outputs per participant, then metrics per target (prefixed by the column
    when there are several). Regression metrics are in the target's own units. With ``motion``
    (participant -> mean framewise displacement), the motion check beside them: ``mean_fd_r``, the
    correlation of the participants' outputs with how much they moved, and ``target_mean_fd_r``, that
    of the target itself: a model can score well by reading head motion where the target goes with it."""
    subjects, subject_outputs = aggregate(participants, outputs)
    subject_labels = np.stack([labels[p] for p in subjects])
    result: dict[str, float] = {}
    if targets[0].task == "multiclass":
        result.update(with_intervals("multiclass", subject_labels[:, 0], subject_outputs, n_boot))
        return result, subjects, subject_outputs
    moved = [i for i, p in enumerate(subjects) if motion and p in motion]
    fd = np.array([motion[subjects[i]] for i in moved]) if moved else None
    for i, target in enumerate(targets):
        if target.task == "regression":
            values = subject_labels[:, i] * target.std + target.mean
            predicted = subject_outputs[:, i : i + 1] * target.std + target.mean
            metrics = with_intervals("regression", values, predicted, n_boot)
        else:
            metrics = with_intervals("binary", subject_labels[:, i], subject_outputs[:, i : i + 1], n_boot)
        n = metrics.pop("n_subjects")
        if len(moved) >= MOTION_CHECK_MIN and np.ptp(fd) > 0:
            metrics["mean_fd_r"] = pearson(subject_outputs[moved, i], fd)
            metrics["target_mean_fd_r"] = pearson(subject_labels[moved, i], fd)
        prefix = "" if len(targets) == 1 else f"{target.column}."
        result.update({f"{prefix}{k}": v for k, v in metrics.items()})
        result["n_subjects"] = n
    return result, subjects, subject_outputs


MOTION_CHECK_MIN = 5  # participants with a mean framewise displacement, for the motion check


def decision_thresholds(targets: list[Target], participants: list[str], outputs: np.ndarray,
                        labels: dict[str, np.ndarray]) -> np.ndarray:
    """Per output column, where a class decision goes, from the participants' mean outputs (validation
    participants: the test never chooses it): a binary target's ``metrics.balanced_threshold``; a target of
    several classes, its ``metrics.balanced_offsets`` (one per class); 0 for a number. Subtracted from the outputs
    (and from the head's bias of the model saved), it leaves the class decision at 0 (at the argmax), where every
    reader of the outputs takes it. A model trained a few epochs, or on a rare class, often puts every participant
    on one side, ranking them well (AUROC) and deciding badly (balanced accuracy near chance)."""
    thresholds = np.zeros(outputs.shape[1])
    if not len(participants):
        return thresholds
    subjects, means = aggregate(participants, outputs)
    truth = np.stack([labels[p] for p in subjects])
    if targets[0].task == "multiclass":
        return balanced_offsets(truth[:, 0], means)
    for i, t in enumerate(targets):
        known = np.isfinite(truth[:, i])
        if t.task == "binary":
            thresholds[i] = balanced_threshold(truth[known, i], means[known, i])
    return thresholds


def selection_score(targets: list[Target], metrics: dict) -> float:
    """Higher is better: AUROC of the first classification target, else minus its MSE."""
    first = targets[0]
    prefix = "" if len(targets) == 1 else f"{first.column}."
    if first.task == "regression":
        return -metrics[f"{prefix}mse"]
    value = metrics[f"{prefix}auroc"]
    return value if np.isfinite(value) else metrics[f"{prefix}balanced_accuracy"]


def in_units(targets: list[Target], participants: list[str], outputs: np.ndarray, labels: dict[str, np.ndarray]):
    """(participants, outputs, labels) with every regression target's outputs and labels in its own units: what
    two models standardised by different participants are compared on."""
    outputs = np.array(outputs, dtype=np.float64)
    truth = np.stack([labels[p] for p in participants]).astype(np.float64)
    if targets[0].task != "multiclass":
        for i, t in enumerate(targets):
            if t.task == "regression":
                outputs[:, i] = outputs[:, i] * t.std + t.mean
                truth[:, i] = truth[:, i] * t.std + t.mean
    return list(participants), outputs, truth


def split_overlap(first: dict, second: dict) -> dict[str, tuple[int, int]]:
    """Per split of ``first`` (split -> ``in_units`` triples) that ``second`` scored only in part: (participants in
    both, participants of ``first``). Two runs split otherwise (another ``--seed`` or ``--split_by``) compare on
    their shared participants alone."""
    overlap = {}
    for split, (who, _, _) in first.items():
        shared = len(set(who) & set(second.get(split, ([], None, None))[0]))
        if shared < len(who):
            overlap[split] = (shared, len(who))
    return overlap


def compare_models(targets: list[Target], first: dict, second: dict, n_boot: int = 1000) -> dict[str, dict]:
    """Per split that both scored: each metric of the first model less the second's on their shared participants,
    with a paired bootstrap interval and p-value (``neurox.train.metrics.paired_difference``). ``first`` and
    ``second``: split -> ``in_units`` triples."""
    from neurox.train.metrics import paired_difference

    result = {}
    for split in [s for s in first if s in second]:
        (who_a, out_a, truth), (who_b, out_b, _) = first[split], second[split]
        index = {p: i for i, p in enumerate(who_b)}
        shared = [i for i, p in enumerate(who_a) if p in index]
        if len(shared) < 3:
            continue
        a, b, y = out_a[shared], out_b[[index[who_a[i]] for i in shared]], truth[shared]
        metrics = {}
        if targets[0].task == "multiclass":
            metrics.update(paired_difference("multiclass", y[:, 0], a, b, n_boot))
        else:
            for i, t in enumerate(targets):
                prefix = "" if len(targets) == 1 else f"{t.column}."
                task = "regression" if t.task == "regression" else "binary"
                difference = paired_difference(task, y[:, i], a[:, i : i + 1], b[:, i : i + 1], n_boot)
                metrics.update({f"{prefix}{k}": v for k, v in difference.items()})
        result[split] = {**metrics, "n_subjects": len(shared)}
    return result

