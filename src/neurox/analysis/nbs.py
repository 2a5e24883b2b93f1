"""Network-based statistic (Zalesky, Fornito & Bullmore 2010): family-wise error control over connected sets of
edges rather than single edges, with more power than edgewise FDR where an effect spans many edges among a few
parcels.

The edges whose t passes the threshold (``t > T`` and, separately, ``t < -T``) form graphs on the parcels; each
connected component's size is its number of edges. The same is done for many permutations of the data, and a
component's p-value is the share of permutations (the observed data among them) whose largest component, of
either sign, is at least as large: so the p-values control the family-wise error over both directions at once.

Permutations follow Freedman & Lane (1983), as FSL's randomise does with nuisance regressors: the edges' residuals
under the covariates alone are permuted and added back to the covariates' fit, and the full model is fitted again.
Without covariates that is permuting the participants between groups (what bctpy's ``nbs_bct`` does). The full
model's t of the permuted data needs no refit: with ``x`` the effect and ``Z`` the covariates (intercept first),
``r`` an edge's residuals on ``Z`` and ``x~`` the effect's, the permuted effect is ``x~' (P r) / x~'x~`` and the
residual sum of squares ``|r|^2 - |U' P r|^2 - (x~' P r)^2 / x~'x~`` (``U`` an orthonormal basis of ``Z``). Both
are products of the permuted ``x~`` and ``U`` (participants long) with ``r``: one matrix product per slice of
edges for a batch of permutations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHA = 0.05  # the family-wise error rate at which a component is called
PERMUTATIONS_AT_ONCE = 100  # the permuted effect and covariate bases held at once: (100 x covariates x n) floats


@dataclass(frozen=True)
class NBSOptions:
    threshold: float  # |t| above which an edge joins the graphs
    permutations: int = 1000
    seed: int = 0


class PermutedT:
    """The effect's t (column 1 of ``design``; column 0 the intercept, the rest covariates) for each permutation of
    the participants, slice by slice of edges. ``permutations`` (P, n): row u of permuted data is row ``perm[u]``."""

    def __init__(self, design: np.ndarray, permutations: np.ndarray):
        n = len(design)
        nuisance = np.delete(design, 1, axis=1)[:, 1:]  # the covariates; the intercept is handled apart
        centred = nuisance - nuisance.mean(0)
        if centred.size:
            u, s, _ = np.linalg.svd(centred, full_matrices=False)
            centred = u[:, s > s[0] * n * np.finfo(float).eps] if s[0] > 0 else u[:, :0]
        # permuting the constant leaves it constant, and the residuals sum to 0: only the covariates' part moves
        self.covariates = centred
        self.basis = np.hstack([np.full((n, 1), n**-0.5), centred])  # orthonormal: Z's columns' span
        self.x = design[:, 1] - self.basis @ (self.basis.T @ design[:, 1])
        self.xx = float(self.x @ self.x)
        self.dof = n - np.linalg.matrix_rank(design)
        self.inverse = np.argsort(permutations, axis=1)  # x~' (P r) = (P' x~)' r: the short vector is permuted

    def __len__(self) -> int:
        return len(self.inverse)

    def t(self, edges: np.ndarray) -> np.ndarray:
        """(P, c) t-values of the edges (n, c), one row per permutation."""
        r = edges - self.basis @ (self.basis.T @ edges)
        rr = (r**2).sum(0)
        out = np.empty((len(self), edges.shape[1]))
        k = self.covariates.shape[1]
        for lo in range(0, len(self), PERMUTATIONS_AT_ONCE):
            inverse = self.inverse[lo : lo + PERMUTATIONS_AT_ONCE]
            a = self.x[inverse] @ r
            rss = rr - a**2 / self.xx
            if k:
                permuted = self.covariates[inverse].transpose(0, 2, 1).reshape(-1, len(r))  # (batch * k, n)
                rss -= ((permuted @ r).reshape(len(inverse), k, -1) ** 2).sum(1)
            out[lo : lo + len(inverse)] = a / np.sqrt(self.xx * np.maximum(rss, 1e-300) / self.dof)
        return out


def permutations(n: int, options: NBSOptions) -> np.ndarray:
    rng = np.random.default_rng(options.seed)
    return np.stack([rng.permutation(n) for _ in range(options.permutations)])


def components(mask: np.ndarray, i: np.ndarray, j: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The connected components of the edges in ``mask`` (over all pairs (i, j) of ``size`` parcels): each
    edge's component (-1 where not in ``mask``) and each component's number of edges, largest first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    chosen = np.flatnonzero(mask)
    label = np.full(len(mask), -1)
    if not len(chosen):
        return label, np.zeros(0, dtype=int)
    graph = coo_matrix((np.ones(len(chosen)), (i[chosen], j[chosen])), shape=(size, size))
    _, nodes = connected_components(graph, directed=False)
    raw = nodes[i[chosen]]
    sizes = np.bincount(raw)
    order = np.argsort(-sizes, kind="stable")
    order = order[sizes[order] > 0]
    rank = np.empty(len(sizes), dtype=int)
    rank[order] = np.arange(len(order))
    label[chosen] = rank[raw]
    return label, sizes[order]


def largest_null(signs: np.ndarray, i: np.ndarray, j: np.ndarray, size: int) -> np.ndarray:
    """(P, 2): each permutation's largest positive and largest negative component, in edges, from ``signs`` (P, E:
    +1 above the threshold, -1 below its negative, 0 between)."""
    out = np.zeros((len(signs), 2), dtype=int)
    for p, row in enumerate(signs):
        for column, sign in enumerate((1, -1)):
            sizes = components(row == sign, i, j, size)[1]
            out[p, column] = sizes[0] if len(sizes) else 0
    return out


def network_based_statistic(t: np.ndarray, signs: np.ndarray, threshold: float, i: np.ndarray, j: np.ndarray,
                            size: int) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """The observed components of ``t`` (E,) at ``threshold``, with family-wise p-values from the permutations'
    ``signs``: (components, each edge's component number, 1-based, 0 for none; the null's largest component of
    either sign per permutation). Components are numbered by size, positive and negative together."""
    null = largest_null(signs, i, j, size).max(1)
    found = []
    for sign in (1, -1):
        label, sizes = components(sign * t > threshold, i, j, size)
        found += [(int(s), sign, label == c) for c, s in enumerate(sizes)]
    found.sort(key=lambda item: -item[0])
    edge_component = np.zeros(len(t), dtype=int)
    summary = []
    for number, (edges, sign, members) in enumerate(found, start=1):
        edge_component[members] = number
        parcels = np.unique(np.concatenate([i[members], j[members]]))
        summary.append({"component": number, "sign": "+" if sign > 0 else "-", "edges": edges,
                        "parcels": parcels.tolist(),
                        "p_fwe": float((1 + (null >= edges).sum()) / (1 + len(null)))})
    return summary, edge_component, null
