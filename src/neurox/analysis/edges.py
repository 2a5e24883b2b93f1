"""Edgewise statistics of connectivity: which parcel pairs differ between two groups, or follow a number,
with covariates (head motion first among them), corrected for the number of edges.

Each edge (the upper triangle of the participants' matrices) gets one ordinary least-squares fit of
``edge ~ 1 + effect + covariates``: ``effect`` is the indicator of the second of two groups (so its
coefficient is the group difference, adjusted; without covariates its t equals the pooled two-sample
t-test's), or a numeric column itself (a slope per unit). Covariates are standardised. The p-values are
two-sided, from Student's t with n - rank degrees of freedom, and the q-values Benjamini-Hochberg's over
every edge.
"""

from __future__ import annotations

import numpy as np

FDR = 0.05


def edge_design(values: list[str], covariates: dict[str, list[str]]) -> tuple[np.ndarray, list[int], str, list[str]]:
    """The design (n_kept, 2 + k), the rows kept (a numeric value for every column), how the effect is coded
    (``two groups: B vs A`` or ``slope``), and the two groups' values (empty for a slope)."""
    distinct = sorted(set(values) - {"", "n/a"}, key=_sort_key)
    numeric = all(_is_number(v) for v in distinct)
    if len(distinct) == 2:
        coding, groups = f"two groups: {distinct[1]} vs {distinct[0]}", distinct
        effect = [1.0 if v == distinct[1] else 0.0 if v == distinct[0] else np.nan for v in values]
    elif numeric and len(distinct) > 2:
        coding, groups = "slope", []
        effect = [float(v) if _is_number(v) else np.nan for v in values]
    else:
        raise ValueError(f"edgewise statistics need two groups or a numeric column; found {len(distinct)} values "
                         f"({', '.join(distinct[:5])}{', ...' if len(distinct) > 5 else ''})")
    columns = [effect] + [[float(v) if _is_number(v) else np.nan for v in c] for c in covariates.values()]
    x = np.array(columns, dtype=float).T
    kept = [i for i in range(len(values)) if np.isfinite(x[i]).all()]
    x = x[kept]
    if x.shape[1] > 1:
        spread = x[:, 1:].std(0)
        x[:, 1:] = (x[:, 1:] - x[:, 1:].mean(0)) / np.where(spread > 0, spread, 1.0)
    return np.column_stack([np.ones(len(x)), x]), kept, coding, groups


def edge_tests(edges: np.ndarray, design: np.ndarray) -> dict[str, np.ndarray]:
    """OLS of every edge (n, E) on ``design`` (n, 2 + k); the effect's coefficient, t and p per edge (q over
    all edges: ``benjamini_hochberg``, once every chunk of edges is tested)."""
    from scipy import stats

    n, rank = len(design), np.linalg.matrix_rank(design)
    dof = n - rank
    if dof < 1:
        raise ValueError(f"edgewise statistics: {n} participants for {rank} coefficients leave no degrees of freedom")
    inverse = np.linalg.pinv(design.T @ design)
    beta = inverse @ design.T @ edges
    residual = edges - design @ beta
    sigma2 = (residual**2).sum(0) / dof
    se = np.sqrt(np.maximum(sigma2 * inverse[1, 1], 1e-300))
    t = beta[1] / se
    p = 2 * stats.t.sf(np.abs(t), dof)
    return {"beta": beta[1], "t": t, "p": p, "dof": np.array(dof)}


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """q-values: the smallest false discovery rate at which each test would be called."""
    order = np.argsort(p)
    scaled = p[order] * len(p) / np.arange(1, len(p) + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty_like(q)
    out[order] = np.minimum(q, 1.0)
    return out


def _is_number(value: str) -> bool:
    try:
        return np.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _sort_key(value: str):
    return (0, float(value), value) if _is_number(value) else (1, 0.0, value)
