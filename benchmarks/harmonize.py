"""ComBat harmonisation (``--harmonize``): what it costs at cohort scale, and what it recovers.

Features like a cohort's connectivity edges (--edges per participant, float32) from --sites sites of unequal size,
each site shifting and scaling every feature by its own amount (a scanner's effect), plus a weak planted effect of
a binary target on a few hundred features. Site and target are independent, as in a balanced multi-site design.
For each cohort size: the time of the fit on four fifths of the participants and of applying it to the rest
(``neurox.analysis.harmonize``), and the test AUROC of the same cross-validated logistic model
(``neurox.analysis.baseline.fit_linear``) on the raw features and on the harmonised ones. Prints one JSON document.

With ``--edgewise``, instead: the edgewise statistics of ``neurox connectivity --group_by`` on all participants,
the target as the group (``neurox.analysis.edges.pair_statistics``), three ways: no adjustment, ``--covariates
site`` (a shift per site), and ``--harmonize site`` (ComBat, the group preserved, two passes over slices of edges).
For each: the time, and the edges at FDR q < 0.05 among the planted ones and among the others.

    python benchmarks/harmonize.py --participants 500 2000 --edges 79800 --sites 20
    python benchmarks/harmonize.py --participants 500 2000 --edges 79800 --sites 20 --edgewise
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from neurox.analysis.baseline import fit_linear, linear_outputs
from neurox.analysis.edges import pair_statistics
from neurox.analysis.harmonize import Harmonisation
from neurox.train.metrics import classification_metrics

PLANTED = 300  # the first 300 edges carry the target's effect


def edgewise(x: np.ndarray, labels: np.ndarray, site: list[str]) -> dict:
    """The edgewise statistics of the target as two groups: unadjusted, site as covariate, ComBat across sites."""
    n, width = x.shape
    pairs, subjects = [(f"e{e}", "") for e in range(width)], [f"p{i}" for i in range(n)]
    values = [str(v) for v in labels]
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, covariates, harmonize in (("unadjusted", {}, None), ("covariates_site", {"site": site}, None),
                                            ("harmonize_site", {}, ("site", site))):
            started = time.perf_counter()
            summary, per_edge = pair_statistics(lambda lo, hi: x[:, lo:hi], pairs, Path(folder) / "edges.tsv",
                                                values, covariates, subjects, harmonize=harmonize)
            found = per_edge["q"] < 0.05
            out[name] = {"seconds": round(time.perf_counter() - started, 2), "dof": summary["dof"],
                         "planted_found": int(found[:PLANTED].sum()), "others_found": int(found[PLANTED:].sum())}
    return out


def cohort(n: int, edges: int, sites: int, rng: np.random.Generator):
    """(features float32, labels, site of each row)."""
    sizes = np.linspace(1, 4, sites) / np.linspace(1, 4, sites).sum()  # unequal sites: the largest 4 times the smallest
    site = rng.choice(sites, n, p=sizes)
    labels = rng.integers(0, 2, n)
    x = np.empty((n, edges), np.float32)
    effect = np.zeros(edges, np.float32)
    effect[:PLANTED] = 0.25  # a weak effect on 300 edges
    shifts = rng.normal(0, 0.5, (sites, edges)).astype(np.float32)  # each site moves every edge its own way
    scales = rng.uniform(0.6, 1.6, (sites, 1)).astype(np.float32) * rng.uniform(0.8, 1.25, (sites, edges)).astype(
        np.float32)
    for lo in range(0, n, 256):  # a block of rows at a time: no float64 copy of the cohort
        rows = slice(lo, min(n, lo + 256))
        noise = rng.standard_normal((rows.stop - lo, edges), dtype=np.float32)
        x[rows] = (noise + labels[rows, None] * effect) * scales[site[rows]] + shifts[site[rows]]
    return x, labels, [f"site{s:02d}" for s in site]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--participants", type=int, nargs="+", default=[500, 2000])
    p.add_argument("--edges", type=int, default=79800, help="features per participant (Schaefer 400: 79,800)")
    p.add_argument("--sites", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--edgewise", action="store_true", help="the edgewise statistics instead of the linear model")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    results = []
    for n in args.participants:
        x, labels, site = cohort(n, args.edges, args.sites, rng)
        if args.edgewise:
            results.append({"participants": n, "edges": args.edges, "sites": args.sites, "planted": PLANTED,
                            **edgewise(x, labels, site)})
            continue
        train, test = np.arange(n) < int(0.8 * n), np.arange(n) >= int(0.8 * n)
        x_train, x_test = x[train], x[test]  # copies
        scores = {}
        for name in ("raw", "harmonised"):
            started = time.perf_counter()
            if name == "harmonised":
                harmonisation = Harmonisation.fit("site", [s for s, t in zip(site, train) if t], x_train)
                fit_s = time.perf_counter() - started
                started = time.perf_counter()
                harmonisation.apply([s for s, t in zip(site, test) if t], x_test)
                apply_s = time.perf_counter() - started
            model = fit_linear(x_train, labels[train], "binary", args.seed)
            scores[name] = classification_metrics(labels[test].astype(float), linear_outputs(model, x_test))["auroc"]
        results.append({"participants": n, "edges": args.edges, "sites": args.sites, "fit_s": round(fit_s, 2),
                        "apply_s": round(apply_s, 2), "test_participants": int(test.sum()),
                        "test_auroc_raw": round(scores["raw"], 3),
                        "test_auroc_harmonised": round(scores["harmonised"], 3)})
        del x, x_train, x_test
    print(json.dumps({"benchmark": "harmonize_edgewise" if args.edgewise else "harmonize",
                      "machine": platform.machine(), "processor": platform.processor(),
                      "seed": args.seed, "results": results}, indent=2))


if __name__ == "__main__":
    main()
