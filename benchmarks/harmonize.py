"""ComBat harmonisation (``--harmonize``): what it costs at cohort scale, and what it recovers.

Features like a cohort's connectivity edges (--edges per participant, float32) from --sites sites of unequal size,
each site shifting and scaling every feature by its own amount (a scanner's effect), plus a weak planted effect of
a binary target on a few hundred features. Site and target are independent, as in a balanced multi-site design.
For each cohort size: the time of the fit on four fifths of the participants and of applying it to the rest
(``neurox.analysis.harmonize``), and the test AUROC of the same cross-validated logistic model
(``neurox.analysis.baseline.fit_linear``) on the raw features and on the harmonised ones. Prints one JSON document.

    python benchmarks/harmonize.py --participants 500 2000 --edges 79800 --sites 20
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from neurox.analysis.baseline import fit_linear, linear_outputs
from neurox.analysis.harmonize import Harmonisation
from neurox.train.metrics import classification_metrics


def cohort(n: int, edges: int, sites: int, rng: np.random.Generator):
    """(features float32, labels, site of each row)."""
    sizes = np.linspace(1, 4, sites) / np.linspace(1, 4, sites).sum()  # unequal sites: the largest 4 times the smallest
    site = rng.choice(sites, n, p=sizes)
    labels = rng.integers(0, 2, n)
    x = np.empty((n, edges), np.float32)
    effect = np.zeros(edges, np.float32)
    effect[:300] = 0.25  # a weak effect on 300 edges
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
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    results = []
    for n in args.participants:
        x, labels, site = cohort(n, args.edges, args.sites, rng)
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
    print(json.dumps({"benchmark": "harmonize", "machine": platform.machine(), "processor": platform.processor(),
                      "seed": args.seed, "results": results}, indent=2))


if __name__ == "__main__":
    main()
