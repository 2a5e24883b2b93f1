"""The closed-form probe's fit on wide embeddings: features fitted directly against in the rows' basis.

``neurox.analysis.baseline.fit_linear`` (used by ``neurox probe``, the FC baseline and ``--head_init probe``)
fits a model with more features than rows in the rows' own basis. This times one cross-validated fit both
ways on synthetic standardised embeddings of --rows participants, for each width in --features (the
``demo`` architecture's per-position readouts: 1,536 last stage, 6,144 stage 2, 24,576 stage 1), and
checks that both give the same outputs. Prints one JSON document.

    python benchmarks/probe_fit.py --rows 102 --features 1536 6144 24576
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import numpy as np


def direct_fit(x: np.ndarray, y: np.ndarray, seed: int):
    """The same model fitted on the standardised features themselves: (scaler, model)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = LogisticRegressionCV(Cs=10, cv=5, max_iter=5000, random_state=seed).fit(scaler.transform(x), y)
    return scaler, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=102, help="training participants (4/5 of 128 in probe_heldout)")
    p.add_argument("--features", type=int, nargs="+", default=[1536, 6144, 24576])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from neurox.analysis.baseline import fit_linear, linear_outputs

    rng = np.random.default_rng(args.seed)
    warm = rng.standard_normal((20, 30)), np.arange(20) % 2  # imports and first calls outside the timings
    fit_linear(*warm, "binary", args.seed)
    direct_fit(*warm, args.seed)
    results = []
    for width in args.features:
        y = np.arange(args.rows) % 2
        x = rng.standard_normal((args.rows, width)) + 0.4 * y[:, None] * (np.arange(width) < 50)
        test = rng.standard_normal((20, width))
        started = time.perf_counter()
        fitted = fit_linear(x, y, "binary", args.seed)
        basis_s = time.perf_counter() - started
        started = time.perf_counter()
        scaler, model = direct_fit(x, y, args.seed)
        direct_s = time.perf_counter() - started
        ours = linear_outputs(fitted, test)[:, 0]
        theirs = model.decision_function(scaler.transform(test))
        results.append({"rows": args.rows, "features": width, "direct_s": round(direct_s, 2),
                        "rows_basis_s": round(basis_s, 2), "speedup": round(direct_s / basis_s, 1),
                        "max_output_difference": float(np.abs(ours - theirs).max()),
                        "output_scale": float(np.abs(theirs).max())})
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"benchmark": "probe_fit", "machine": platform.machine(), "processor": platform.processor(),
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
