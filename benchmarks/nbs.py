"""The network-based statistic (``neurox connectivity --group_by G --nbs T``): its cost at atlas scale, and what it
finds beside the edgewise FDR.

Edges of --parcels parcels (Schaefer 400: 79,800) for each cohort size, float32: noise, a site shift per edge
(--sites sites, adjusted for as a covariate) and an age slope on every edge (age a covariate too), and a weak group
effect (--effect standard deviations) on every edge among the first --planted_parcels parcels: a connected
component, as a network-level difference would be. The edgewise statistics and the permutations run as the command
runs them (``neurox.analysis.edges.pair_statistics`` over slices of edges, then ``network_based_statistic``), with
the group as the effect and site and age as covariates. For each: the time, and the edges called, among the planted
ones and among the others, at FDR q < 0.05 edge by edge and in the components of p_FWE < 0.05. Prints one JSON
document.

    python benchmarks/nbs.py --participants 200 500 2000 --parcels 400 --threshold 3 --permutations 1000
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from neurox.analysis.edges import pair_statistics
from neurox.analysis.nbs import ALPHA, NBSOptions, network_based_statistic


def cohort(n: int, parcels: int, planted_parcels: int, effect: float, sites: int, rng: np.random.Generator):
    """(edges float32 (n, E), group, site, age, which edges are planted)."""
    i, j = np.triu_indices(parcels, k=1)
    planted = (i < planted_parcels) & (j < planted_parcels)
    group, site, age = rng.integers(0, 2, n), rng.integers(0, sites, n), rng.uniform(8, 80, n)
    shifts = rng.normal(0, 0.5, (sites, len(i))).astype(np.float32)
    slope = rng.normal(0, 0.01, len(i)).astype(np.float32)
    x = np.empty((n, len(i)), np.float32)
    for lo in range(0, n, 256):  # a block of rows at a time: no float64 copy of the cohort
        rows = slice(lo, min(n, lo + 256))
        x[rows] = rng.standard_normal((rows.stop - lo, len(i)), dtype=np.float32) + shifts[site[rows]] \
            + age[rows, None].astype(np.float32) * slope + effect * group[rows, None] * planted
    return x, group, site, age, planted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--participants", type=int, nargs="+", default=[200, 500, 2000])
    p.add_argument("--parcels", type=int, default=400)
    p.add_argument("--planted_parcels", type=int, default=20, help="the effect is on every edge among these")
    p.add_argument("--effect", type=float, default=0.2, help="the group difference, in the noise's SD")
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--threshold", type=float, default=3.0)
    p.add_argument("--permutations", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    i, j = np.triu_indices(args.parcels, k=1)
    results = []
    for n in args.participants:
        x, group, site, age, planted = cohort(n, args.parcels, args.planted_parcels, args.effect, args.sites, rng)
        pairs, subjects = [(f"p{a}", f"p{b}") for a, b in zip(i, j)], [f"s{k}" for k in range(n)]
        covariates = {"site": [f"site{s}" for s in site], "age": [f"{a:.2f}" for a in age]}
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            summary, per_edge = pair_statistics(lambda lo, hi, x=x: x[:, lo:hi], pairs, Path(folder) / "edges.tsv",
                                                [str(g) for g in group], covariates, subjects)
            edgewise_seconds = time.perf_counter() - started
            started = time.perf_counter()
            options = NBSOptions(args.threshold, args.permutations, args.seed)
            _, with_nbs = pair_statistics(lambda lo, hi, x=x: x[:, lo:hi], pairs, Path(folder) / "edges.tsv",
                                          [str(g) for g in group], covariates, subjects, nbs=options)
            permuted_seconds = time.perf_counter() - started
        started = time.perf_counter()
        found, edge_component, null = network_based_statistic(with_nbs["t"], with_nbs["null_signs"], args.threshold,
                                                              i, j, args.parcels)
        components_seconds = time.perf_counter() - started
        fdr = per_edge["q"] < 0.05
        called = np.isin(edge_component, [c["component"] for c in found if c["p_fwe"] < ALPHA])
        results.append({
            "participants": n, "edges": len(i), "planted": int(planted.sum()), "dof": summary["dof"],
            "fdr": {"planted_found": int(fdr[planted].sum()), "others_found": int(fdr[~planted].sum()),
                    "seconds": round(edgewise_seconds, 2)},
            "nbs": {"planted_found": int(called[planted].sum()), "others_found": int(called[~planted].sum()),
                    "components_significant": sum(c["p_fwe"] < ALPHA for c in found),
                    "largest": found[0]["edges"] if found else 0, "largest_p_fwe": found[0]["p_fwe"] if found else None,
                    "null_largest_95": float(np.quantile(null, 0.95)),
                    "seconds_edgewise_and_permutations": round(permuted_seconds, 2),
                    "seconds_components": round(components_seconds, 2)}})
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"benchmark": "nbs", "machine": platform.platform(), "processor": platform.processor(),
                      "threshold": args.threshold, "permutations": args.permutations, "effect": args.effect,
                      "sites": args.sites, "results": results}, indent=2))


if __name__ == "__main__":
    main()
