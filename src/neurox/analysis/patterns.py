"""Which connections drove the FC baseline: each edge's activation pattern beside its weight.

A linear model's weights are not a map of where the signal is: an edge can carry a large weight because it
cancels noise shared with others while holding nothing of the target itself (Haufe et al. 2014, NeuroImage).
The activation pattern is: for one output, each feature's covariance with the model's output over the training
participants (Haufe's ``A = cov(X) W / var(output)``, up to scale). neurox writes it as a correlation, so that
edges compare on one scale, in ``patterns.tsv`` (every edge: the two parcels' labels, names and networks, each
target's weight on the standardised edge and pattern, the strongest pattern first) and, where the atlas names
its networks, ``network_patterns.tsv`` (each pair of networks: the mean pattern of its edges and how many).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neurox.data.store import write_tsv


def activation_patterns(x: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """(outputs, features): the correlation of each feature of the rows ``x`` with each output column over them;
    0 for a feature or output that does not vary. Computed a block of columns at a time (a cohort's edges)."""
    from neurox.analysis.baseline import column_blocks

    centred = outputs - outputs.mean(0)
    spread = centred.std(0)
    scores = np.divide(centred, spread, out=np.zeros_like(centred), where=spread > 0)
    patterns = np.zeros((outputs.shape[1], x.shape[1]))
    for columns, block in column_blocks(x):
        block = block - block.mean(0)
        sd = block.std(0)
        z = np.divide(block, sd, out=np.zeros_like(block), where=sd > 0)
        patterns[:, columns] = scores.T @ z / len(x)
    return patterns


def write_patterns(out: Path, columns: list[str], weights: np.ndarray, patterns: np.ndarray, labels: list[int],
                   names: list[str], networks: list[str] | None, diagonal: bool) -> None:
    """``patterns.tsv`` (and ``network_patterns.tsv`` with ``networks``) of one row per feature: the upper
    triangle of the parcels' matrix, with its ``diagonal`` for the tangent space. ``columns`` names the model's
    outputs (a target, or ``target_class`` for several classes), ``weights`` and ``patterns`` (outputs,
    features) follow them."""
    a, b = np.triu_indices(len(labels), k=0 if diagonal else 1)
    order = np.argsort(-np.abs(patterns[0]), kind="stable")
    rows = []
    for e in order:
        row = {"parcel_a": labels[a[e]], "parcel_b": labels[b[e]], "name_a": names[a[e]], "name_b": names[b[e]]}
        if networks:
            row.update(network_a=networks[a[e]], network_b=networks[b[e]])
        for c, column in enumerate(columns):
            row[f"{column}_weight"] = round(float(weights[c, e]), 6)
            row[f"{column}_pattern"] = round(float(patterns[c, e]), 6)
        rows.append(row)
    write_tsv(out / "patterns.tsv", rows, list(rows[0]) if rows else ["parcel_a", "parcel_b"])
    if not networks:
        return
    pair = [tuple(sorted((networks[i], networks[j]))) for i, j in zip(a, b)]
    keys = sorted(set(pair))
    index = {key: k for k, key in enumerate(keys)}
    of_edge = np.array([index[p] for p in pair])
    summary = []
    for k, (first, second) in enumerate(keys):
        members = of_edge == k
        summary.append({"network_a": first, "network_b": second, "edges": int(members.sum()),
                        **{f"{column}_pattern": round(float(patterns[c, members].mean()), 6)
                           for c, column in enumerate(columns)}})
    summary.sort(key=lambda r: -abs(r[f"{columns[0]}_pattern"]))
    write_tsv(out / "network_patterns.tsv", summary, list(summary[0]))
