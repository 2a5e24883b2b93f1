"""Runs onto a grid of another voxel size: 2 mm onto the 4 mm box (what the small models read) and 3 mm, the
BOLD's own voxel size that fMRIPrep's default MNI output keeps, onto the 2 mm box (``--resample``).

The inputs are ``benchmarks/data.py``'s BOLD-like runs (white noise of standard deviation 10 on slow signals in
the brain): its 2 mm run (91x109x91, MNI152NLin6Asym's grid) and the same content made on a 3 mm grid (61x73x61,
half a voxel off the box's centres). Each is prepared in a fresh process (time, peak resident memory). For the
4 mm store, the in-brain standard deviation of the difference of successive frames (in the run's units) says
whether each 4 mm voxel is the average of the 2 mm voxels it covers or a sample of one (the 2 mm store's
figure: all the white noise passes). Prints one JSON document.

    python benchmarks/grid.py --workdir /tmp/neurox-bench-data --frames 600
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

GRID_3MM = (61, 73, 61)
AFFINE_3MM = np.array([[3.0, 0, 0, -90.5], [0, 3.0, 0, -126.5], [0, 0, 3.0, -72.5], [0, 0, 0, 1.0]])


def frame_noise(store_path: Path) -> float:
    """The in-brain standard deviation of the difference of successive frames, in the raw run's units."""
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
    n = args.frames
    two_mm = make_input(work / f"run{n}_bold.nii.gz", n)
    three_mm = make_input(work / f"run{n}-3mm_bold.nii.gz", n, grid=GRID_3MM, affine=AFFINE_3MM)
    for source in (two_mm, three_mm):  # the manifest prepare_in_child writes names a table
        confounds_table(source.with_name(source.name.replace("_bold.nii.gz", "_confounds.tsv")), n)
    cases = {"2mm_onto_2mm": (two_mm, 2.0, False), "2mm_onto_4mm": (two_mm, 4.0, False),
             "3mm_onto_2mm_resampled": (three_mm, 2.0, True)}
    results = {}
    for name, (source, voxel, resample) in cases.items():
        out = work / f"grid{n}-{name}"
        shutil.rmtree(out, ignore_errors=True)
        results[name] = prepare_in_child(source, out, voxel_size=voxel, resample=resample)
        if name.startswith("2mm"):
            results[name]["frame_noise"] = round(frame_noise(out), 3)
    print(json.dumps({
        "benchmark": "grid", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"), "frames": n, "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
