"""What a split's metrics cost: the bootstrap intervals and the permutation p-value, by cohort size.

``neurox.train.metrics.with_intervals`` gives every metric a 95% bootstrap interval over participants (``n_boot``
resamples, each recomputing the metrics) and the main one a permutation p-value (as many label permutations, each
a rank sum over the fixed outputs). This times both parts for a binary and a regression target on synthetic
outputs of --participants participants each, and checks the p-value against recomputing the metric on each
permutation for the smallest size. Prints one JSON document.

    python benchmarks/metrics.py --participants 100 1000 8000 --n_boot 1000
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from neurox.train.metrics import classification_metrics, pearson, permutation_p, with_intervals


def synthetic(task: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if task == "binary":
        labels = rng.integers(0, 2, n).astype(float)
        return labels, (0.5 * labels + rng.normal(0, 1, n))[:, None]
    values = rng.normal(0, 1, n)
    return values, (0.3 * values + rng.normal(0, 1, n))[:, None]


def brute_force_p(task: str, labels: np.ndarray, outputs: np.ndarray, n_perm: int, seed: int) -> float:
    """The p-value from recomputing the metric on each permutation, in the order permutation_p draws them."""
    draw = np.random.default_rng([seed, 1])

    def metric(y):
        return pearson(y, outputs[:, 0]) if task == "regression" else classification_metrics(y, outputs)["auroc"]

    observed = metric(labels)
    return (1 + sum(metric(draw.permutation(labels)) >= observed - 1e-12 for _ in range(n_perm))) / (1 + n_perm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--participants", type=int, nargs="+", default=[100, 1000, 8000])
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples, and as many permutations")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    with_intervals("binary", *synthetic("binary", 50, rng), 10)  # imports and first calls, outside the timings
    results = []
    for task in ("binary", "regression"):
        for n in args.participants:
            labels, outputs = synthetic(task, n, rng)
            started = time.perf_counter()
            metrics = with_intervals(task, labels, outputs, args.n_boot, args.seed)
            whole = time.perf_counter() - started
            started = time.perf_counter()
            permutation_p(task, labels, outputs, args.n_boot, args.seed)
            permutations = time.perf_counter() - started
            key = "auroc_p" if task == "binary" else "pearson_r_p"
            row = {"task": task, "participants": n, "with_intervals_s": round(whole, 3),
                   "of_which_permutations_s": round(permutations, 3), "p": metrics[key]}
            if n == min(args.participants):
                row["p_brute_force"] = brute_force_p(task, labels, outputs, args.n_boot, args.seed)
            results.append(row)
    print(json.dumps({"benchmark": "metrics", "machine": platform.platform(), "processor": platform.processor(),
                      "n_boot": args.n_boot, "results": results}, indent=1))


if __name__ == "__main__":
    main()
