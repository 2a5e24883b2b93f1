"""Preparing 2 mm runs onto the 4 mm grid (``--voxel_size 4 --resample``): time, and what a 4 mm voxel holds.

The input is ``benchmarks/data.py``'s HCP/UK Biobank-shaped run (MNI152NLin6Asym 2 mm, 91x109x91, float32,
gzipped, white noise of standard deviation 10 on slow signals in the brain). Each 4 mm voxel is the average of
the 2 mm voxels it covers, so the white noise left in the store is the noise of that average: the ratio of the
stored frames' frame-to-frame noise to that of a 2 mm store of the same run says whether voxels were averaged
(about 0.2 = sqrt of 0.375^3, the weights' sum of squares) or sampled (about 1). Prints one JSON document.

    python benchmarks/coarser_grid.py --workdir /tmp/neurox-bench-data --frames 600
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from data import confounds_table, make_input, prepare_in_child  # noqa: E402


def frame_noise(store_path: Path) -> float:
    """The in-brain standard deviation of the difference of successive frames, in the raw run's units (the
    slow signals cancel; the white noise stays, times sqrt 2)."""
    from neurox.data.store import Store

    store = Store(store_path)
    run_id = store.run_ids[0]
    frames = store.run(run_id).read(0, 40).astype(np.float64)[:, store.mask(run_id)]
    scale = store.run(run_id).attributes["normalization"]["std"]
    return float(np.diff(frames, axis=0).std() * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/neurox-bench-data")
    parser.add_argument("--frames", type=int, default=600)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    source = make_input(work / f"run{args.frames}_bold.nii.gz", args.frames)
    confounds_table(work / f"run{args.frames}_confounds.tsv", args.frames)  # the manifest names one
    stores = {voxel: work / f"coarser{args.frames}-{voxel:g}mm" for voxel in (2.0, 4.0)}
    timings = {}
    for voxel, out in stores.items():
        shutil.rmtree(out, ignore_errors=True)
        timings[voxel] = prepare_in_child(source, out, voxel_size=voxel)
    noise = {voxel: frame_noise(out) for voxel, out in stores.items()}
    print(json.dumps({
        "benchmark": "coarser_grid", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"), "frames": args.frames, "grid_in": [91, 109, 91],
        "prepare_2mm_s": timings[2.0]["seconds"], "prepare_4mm_resampled_s": timings[4.0]["seconds"],
        "peak_rss_gib_4mm": timings[4.0]["peak_rss_gib"],
        "frame_noise_2mm": round(noise[2.0], 3), "frame_noise_4mm": round(noise[4.0], 3),
        "noise_ratio_4mm_to_2mm": round(noise[4.0] / noise[2.0], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
