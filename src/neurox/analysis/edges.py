"""Edgewise statistics of connectivity: which parcel pairs differ between two groups, or follow a number,
with covariates (head motion first among them), corrected for the number of edges.

Each edge (the upper triangle of the participants' matrices) gets one ordinary least-squares fit of
``edge ~ 1 + effect + covariates``: ``effect`` is the indicator of the second of two groups (so its
coefficient is the group difference, adjusted; without covariates its t equals the pooled two-sample
t-test's), or a numeric column itself (a slope per unit). Covariates enter as in the linear models
(neurox.analysis.covariates): numbers standardised, labels (site, scanner, sex) as one indicator per level but
the first, so that ``--covariates site`` compares the groups within sites. The p-values are two-sided, from
Student's t with n - rank degrees of freedom, and the q-values Benjamini-Hochberg's over every edge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neurox.analysis.covariates import covariate_design, covariate_encoding
from neurox.analysis.nbs import NBSOptions
from neurox.data.loader import missing_value

FDR = 0.05
SLICE_VALUES = 1 << 22  # participants x pairs tested at once: 32 MiB of float64 (8,192 pairs of 512 participants)


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
    raw = [[str(c[i]).strip() for c in covariates.values()] for i in range(len(values))]
    kept = [i for i in range(len(values)) if np.isfinite(effect[i]) and not any(missing_value(v) for v in raw[i])]
    rows = [raw[i] for i in kept]
    terms = covariate_design(covariate_encoding(list(covariates), rows), rows)[:, 1:]
    design = np.column_stack([np.ones(len(kept)), np.array(effect)[kept], terms])
    rank = np.linalg.matrix_rank(design) if len(kept) else 0
    if len(kept) > rank and rank == np.linalg.matrix_rank(np.delete(design, 1, axis=1)):  # (too few rows: edge_tests)
        raise ValueError(f"the effect ({coding}) cannot be told apart from the covariates "
                         f"({', '.join(covariates)}): each level of a label covariate needs participants of both "
                         "groups (or several values of the number)")
    return design, kept, coding, groups


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


def pair_statistics(pair_values, pairs: list[tuple[str, str]], tsv: Path, values: list[str],
                    covariates: dict[str, list[str]], subjects: list[str], columns=("parcel_a", "parcel_b"),
                    chunk: int | None = None, harmonize: tuple[str, list[str]] | None = None,
                    nbs: NBSOptions | None = None, progress: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """The statistics of every pair (``pair_values(lo, hi)``: the participants' values of pairs lo..hi, (n, hi-lo)),
    written to ``tsv`` sorted by p. ``harmonize``, (a site column, each participant's value): ComBat across its
    values first, preserving the effect and covariates (the group means too are of the harmonised values).
    ``nbs``: the t of each of its permutations too, as ``null_signs`` (permutations, pairs: +1 above its
    threshold, -1 below the negative, else 0; neurox.analysis.nbs). Returns the summary (the test, n, edges at
    q < FDR, the five strongest; or why none was computed) and the per-pair t and q."""
    from neurox.analysis.harmonize import harmonised_slices
    from neurox.analysis.nbs import PermutedT, permutations
    from neurox.data.store import write_tsv
    from neurox.progress import progress as progress_display

    parts, means, signs = [], {}, []
    if harmonize:  # a participant of no known site is left out, as one of no known group
        values = ["" if missing_value(site) else v for v, site in zip(values, harmonize[1])]
    try:
        design, kept, coding, groups = edge_design(values, covariates)
        members = {g: [k for k, row in enumerate(kept) if values[row] == g] for g in groups}
        # in slices of pairs: memory stays at participants x chunk (float64, a few copies), whatever the cohort
        # (with --nbs, wider: each slice's permutations gather the permuted covariates once per batch of them,
        # and a slice of 512 edges or more keeps that below the products' work at any cohort size)
        chunk = chunk or max(512 if nbs else 64, SLICE_VALUES // max(len(kept), 1))

        def read(lo: int, hi: int) -> np.ndarray:
            return np.asarray(pair_values(lo, hi))[kept].astype(np.float64)

        slices = ((lo, read(lo, lo + chunk)) for lo in range(0, len(pairs), chunk))
        if harmonize:
            slices = harmonised_slices(read, len(pairs), chunk, harmonize[0], [harmonize[1][k] for k in kept],
                                       design[:, 1:])
        null = PermutedT(design, permutations(len(kept), nbs)) if nbs else None
        bar = progress_display(total=len(pairs), desc="edges", unit="edge", disable=not progress)
        for _, edges in slices:
            parts.append(edge_tests(edges, design))
            for g in groups:
                means.setdefault(g, []).append(edges[members[g]].mean(0))
            if null is not None:
                t = null.t(edges)
                signs.append((t > nbs.threshold).astype(np.int8) - (t < -nbs.threshold).astype(np.int8))
            bar.update(edges.shape[1])
        bar.close()
    except ValueError as err:
        return {"skipped": str(err)}, {}
    tests = {key: np.concatenate([part[key] for part in parts]) for key in ("beta", "t", "p")}
    tests["q"] = benjamini_hochberg(tests["p"])
    means = {g: np.concatenate(m) for g, m in means.items()}
    order = np.argsort(tests["p"], kind="stable")
    a, b = columns
    write_tsv(tsv, [{a: pairs[e][0], b: pairs[e][1], **{f"mean_{g}": f"{means[g][e]:.6g}" for g in groups},
                     "effect": f"{tests['beta'][e]:.6g}", "t": f"{tests['t'][e]:.4f}", "p": f"{tests['p'][e]:.4g}",
                     "q": f"{tests['q'][e]:.4g}"} for e in order],
              [a, b, *[f"mean_{g}" for g in groups], "effect", "t", "p", "q"])
    kept_set = set(kept)
    summary = {"test": coding, "covariates": list(covariates),
               **({"harmonize": harmonize[0]} if harmonize else {}), "n": len(kept),
               "left_out": [s for k, s in enumerate(subjects) if k not in kept_set], "dof": int(parts[0]["dof"]),
               "edges": len(order), "fdr": FDR, "significant": int((tests["q"] < FDR).sum()),
               "top": [{a: pairs[e][0], b: pairs[e][1], "t": round(float(tests["t"][e]), 3),
                        "q": float(f"{tests['q'][e]:.4g}")} for e in order[:5]]}
    return summary, {"t": tests["t"], "q": tests["q"], **({"null_signs": np.concatenate(signs, axis=1)} if nbs else {})}


def network_blocks(stack: np.ndarray, networks: list[str]) -> tuple[np.ndarray, list[tuple[int, int]], list[str]]:
    """Each participant's mean connectivity within and between networks: (participants, pairs), the pairs of
    network indices (a <= b; within a network, the mean over its distinct parcel pairs, so one-parcel networks
    have none), and the network names."""
    names = sorted(set(networks))
    members = [np.flatnonzero(np.array(networks) == name) for name in names]
    pairs, columns = [], []
    for a in range(len(names)):
        for b in range(a, len(names)):
            block = stack[:, members[a]][:, :, members[b]]
            if a == b:
                if len(members[a]) < 2:
                    continue
                upper = np.triu_indices(len(members[a]), k=1)
                columns.append(block[:, upper[0], upper[1]].mean(1))
            else:
                columns.append(block.mean(axis=(1, 2)))
            pairs.append((a, b))
    return np.stack(columns, axis=1), pairs, names


def _is_number(value: str) -> bool:
    try:
        return np.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _sort_key(value: str):
    return (0, float(value), value) if _is_number(value) else (1, 0.0, value)
