"""The FC baseline's linear fit at cohort scale: time and peak memory of one cross-validated fit.

``neurox.analysis.baseline.fit_linear`` fits connectivity edges (79,800 for Schaefer 400) of fewer
participants in the participants' own basis. It gets that basis from the participants x participants Gram
matrix, summed over blocks of standardised columns of the float32 features ("gram"). This compares it with
the way it was got before: a float64 copy of the features, standardised, then their SVD ("svd", kept here
as the reference). Each fit runs in its own process, so that its peak resident memory is its own; the
features are synthetic (a few planted directions, then noise), as float32 as ``neurox baseline`` holds them.
Prints one JSON line per fit, then one JSON document.

    python benchmarks/baseline_fit.py --rows 500 1000 2000 --features 79800 --task binary
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np


def cohort(rows: int, features: int, seed: int):
    """(x float32, y, test float32): features with 20 shared directions, the target planted in the first."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((20, features)).astype(np.float32)

    def draw(n):  # in blocks of rows, so that the process's peak memory is the fit's, not the generator's
        loadings = rng.standard_normal((n, 20)).astype(np.float32)
        x = np.empty((n, features), np.float32)
        for lo in range(0, n, 128):
            x[lo : lo + 128] = loadings[lo : lo + 128] @ directions
            x[lo : lo + 128] += rng.standard_normal((len(x[lo : lo + 128]), features), dtype=np.float32) * 3
        return x, loadings[:, 0]

    x, signal = draw(rows)
    test, _ = draw(200)
    return x, (signal + rng.standard_normal(rows) > 0).astype(int), test


def svd_fit(x: np.ndarray, y: np.ndarray, task: str, seed: int) -> dict:
    """The reference: the rows' basis from the SVD of a float64 standardised copy of ``x``."""
    from sklearn.preprocessing import StandardScaler

    from neurox.analysis.baseline import _fit_penalised

    scaler = StandardScaler().fit(x.astype(np.float64))
    z = scaler.transform(x.astype(np.float64))
    basis = np.linalg.svd(z, full_matrices=False)[2]
    coef, intercept = _fit_penalised(z @ basis.T, y, task, seed)
    return {"mean": scaler.mean_, "scale": scaler.scale_, "coef": coef @ basis, "intercept": intercept}


def one(method: str, rows: int, features: int, task: str, seed: int) -> None:
    from neurox.analysis.baseline import fit_linear, linear_outputs

    x, y, test = cohort(rows, features, seed)
    if task == "regression":
        y = x[:, :50].sum(1, dtype=np.float64)
    data_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    started = time.perf_counter()
    fitted = (fit_linear if method == "gram" else svd_fit)(x, y, task, seed)
    seconds = time.perf_counter() - started
    print(json.dumps({"method": method, "rows": rows, "features": features, "task": task,
                      "fit_s": round(seconds, 2), "data_gib": round(x.nbytes / 2**30, 2),
                      "rss_before_fit_gib": round(data_rss, 2),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                      "outputs": linear_outputs(fitted, test)[:, 0].tolist()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[500, 1000, 2000], help="training participants")
    p.add_argument("--features", type=int, default=79800, help="edges (79,800: Schaefer 400)")
    p.add_argument("--task", default="binary", choices=["binary", "regression"])
    p.add_argument("--methods", nargs="+", default=["svd", "gram"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args.one, args.rows[0], args.features, args.task, args.seed)
    results = []
    for rows in args.rows:
        fits = {}
        for method in args.methods:
            done = subprocess.run([sys.executable, __file__, "--one", method, "--rows", str(rows), "--features",
                                   str(args.features), "--task", args.task, "--seed", str(args.seed)],
                                  capture_output=True, text=True, check=True)
            fits[method] = json.loads(done.stdout.strip().splitlines()[-1])
            outputs = np.array(fits[method].pop("outputs"))
            fits[method]["output_scale"] = float(np.abs(outputs).max())
            if method == args.methods[0]:
                reference = outputs
            else:
                fits[method][f"max_output_difference_from_{args.methods[0]}"] = float(np.abs(outputs - reference).max())
            results.append(fits[method])
            print(json.dumps(fits[method]), flush=True)
    print(json.dumps({"benchmark": "baseline_fit", "machine": platform.machine(), "cpus": os.cpu_count(),
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
