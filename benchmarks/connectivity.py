"""Connectivity at cohort scale: time and peak memory of `neurox connectivity` as participants grow.

Makes one synthetic cohort (4 mm grid, ``--parcels`` parcels, ``--frames`` frames a run) and prepares it,
then runs `neurox connectivity` (Fisher z, ``simple`` denoising, edgewise statistics of ``coupling_group``
with ``mean_fd`` as covariate) on the first N participants for each N of ``--participants``, each in a
fresh process, whose peak resident memory is reported (of the main process: with ``--workers``, each
worker holds one participant's runs besides). The largest N is run again with ``--workers`` processes, and
the second N with ``--kind tangent`` (the geometric mean's passes over the matrices, then the projection),
with one process and with ``--workers``.
Memory that grows with N is what limits a cohort of tens of thousands (a 400 x 400 float32 matrix is
0.64 MB a participant). Prints one JSON document.

    python benchmarks/connectivity.py --workdir /tmp/neurox-bench-fc
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
from pathlib import Path

MEASURE = """
import json, resource, sys, time
import neurox
store, atlas, out, n, workers, kind = sys.argv[1:4] + [int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]]
ids = sorted(l.split("\\t")[0] for l in open(store + "/participants.tsv").read().splitlines()[1:])[:n]
start = time.perf_counter()
neurox.connectivity(store, atlas, out, confounds="simple", participants=ids, group_by="coupling_group",
                    covariates=["mean_fd"], workers=workers, kind=kind, quiet=True)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/neurox-bench-fc")
    parser.add_argument("--participants", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--parcels", type=int, default=400)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="the largest N is run again with this many workers")
    args = parser.parse_args()

    import neurox

    work = Path(args.workdir)
    n_max = max(args.participants)
    cohort, store = work / f"cohort-{n_max}-{args.parcels}", work / f"store-{n_max}-{args.parcels}"
    started = time.perf_counter()
    if not (store / "manifest.tsv").is_file():
        neurox.synth(cohort, n_subjects=n_max, n_frames=args.frames, voxel_size=4.0, n_parcels=args.parcels,
                     workers=2, quiet=True)
        neurox.prepare(cohort, store, participants=cohort / "participants.tsv", voxel_size=4.0, workers=2, quiet=True)
    setup_s = time.perf_counter() - started
    atlas = next((cohort / "ground_truth").glob("atlas-synthetic_space-*_dseg.nii.gz"))

    results = []
    n_tangent = sorted(args.participants)[min(1, len(args.participants) - 1)]
    runs = [(n, 1, "fisher_z") for n in sorted(args.participants)] + [(n_max, args.workers, "fisher_z"),
                                                                      (n_tangent, 1, "tangent"),
                                                                      (n_tangent, args.workers, "tangent")]
    for n, workers, kind in runs:
        out = work / f"fc-{n}-{workers}-{kind}"
        done = subprocess.run([sys.executable, "-c", MEASURE, str(store), str(atlas), str(out), str(n), str(workers),
                               kind], capture_output=True, text=True, check=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        npz = out / "connectivity.npz"
        results.append({"participants": n, "workers": workers, "kind": kind,
                        **{k: round(v, 3) for k, v in measured.items()},
                        "connectivity_npz_mb": round(npz.stat().st_size / 2**20, 1)})
        print(json.dumps(results[-1]), file=sys.stderr)
    first, last, pooled, tangent, tangent_pooled = results[0], results[-4], results[-3], results[-2], results[-1]
    fisher_z = next(r for r in results if (r["participants"], r["workers"]) == (n_tangent, 1))
    print(json.dumps({
        "benchmark": "connectivity", "parcels": args.parcels, "frames": args.frames,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "setup_seconds": round(setup_s, 1), "results": results,
        "peak_rss_ratio_last_to_first": round(last["peak_rss_gib"] / first["peak_rss_gib"], 2),
        "participants_ratio": last["participants"] / first["participants"],
        f"speedup_{args.workers}_workers": round(last["seconds"] / pooled["seconds"], 2),
        "tangent_over_fisher_z_time": round(tangent["seconds"] / fisher_z["seconds"], 2),
        f"tangent_speedup_{args.workers}_workers": round(tangent["seconds"] / tangent_pooled["seconds"], 2),
        "this_process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
