"""``prepare`` over a store of many finished runs: what a re-run, or an array job's shard, costs before and after
its own work.

Every shard of an array job (``--shard i/N``) checks each of its runs against the store, and rebuilds
``manifest.tsv`` from every run in the store when it ends; a re-run after a crash does both over the whole cohort.
This makes a store of ``--runs`` finished runs (one small prepared run, its shard file hard-linked under each run's
name, each with its own attributes) and a TSV manifest naming them, then times ``neurox.data.prepare.prepare``
over it with nothing left to do (best of three) and, apart, the rebuild of the manifest. Prints one JSON document.

    python benchmarks/store_scale.py --workdir /tmp/neurox-bench-store --runs 10000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def small_run(path: Path) -> Path:
    """A 4 mm run of 24 frames whose brain sits where MNI brains sit."""
    affine = np.array([[4.0, 0, 0, -80.0], [0, 4.0, 0, -116.0], [0, 0, 4.0, -66.0], [0, 0, 0, 1]])
    world = np.indices((40, 48, 40)).reshape(3, -1).T @ affine[:3, :3].T + affine[:3, 3]
    brain = ((((world - [0, -20, 10]) / [60, 80, 55]) ** 2).sum(1) <= 1).reshape(40, 48, 40)
    data = 1000 + 20 * np.random.default_rng(0).standard_normal((40, 48, 40, 24))
    img = nib.Nifti1Image((data * brain[..., None]).astype(np.float32), affine)
    img.header.set_zooms((4.0, 4.0, 4.0, 2.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def make_store(root: Path, runs: int, options) -> tuple[Path, Path]:
    """The store of ``runs`` finished runs and the manifest naming them (kept between calls)."""
    from neurox.data.prepare import prepare

    store, manifest = root / f"store-{runs}", root / f"runs-{runs}.tsv"
    if (root / f".made-{runs}").exists():
        return store, manifest
    shutil.rmtree(store, ignore_errors=True)
    bold = small_run(root / "run.nii.gz")
    one = root / "one.tsv"
    one.write_text(f"participant_id\tpath\nsub-00000\t{bold}\n")
    assert prepare(one, store, options, progress=False).ok
    template = store / "runs" / "sub-00000.zarr"
    meta = json.loads((template / "zarr.json").read_text())
    for i in range(1, runs):
        run_id = f"sub-{i:05d}"
        folder = store / "runs" / f"{run_id}.zarr"
        (folder / "c" / "0" / "0" / "0").mkdir(parents=True)
        os.link(template / "c" / "0" / "0" / "0" / "0", folder / "c" / "0" / "0" / "0" / "0")
        meta["attributes"].update(participant_id=run_id, run_id=run_id)
        (folder / "zarr.json").write_text(json.dumps(meta))
    manifest.write_text("participant_id\tpath\n" + "".join(f"sub-{i:05d}\t{bold}\n" for i in range(runs)))
    (root / f".made-{runs}").touch()
    return store, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/neurox-bench-store")
    parser.add_argument("--runs", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from neurox.data.grid import TargetGrid
    from neurox.data.prepare import prepare, write_manifest
    from neurox.data.preprocess import PrepareOptions

    options = PrepareOptions(grid=TargetGrid.default(4.0), min_frames=8)
    store, manifest = make_store(Path(args.workdir), args.runs, options)
    timings = {"prepare_nothing_to_do": [], "manifest_rebuild": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        report = prepare(manifest, store, options, progress=False)
        timings["prepare_nothing_to_do"].append(time.perf_counter() - start)
        assert len(report.skipped) == args.runs and not report.done and not report.failed
        start = time.perf_counter()
        write_manifest(store, "zarr")
        timings["manifest_rebuild"].append(time.perf_counter() - start)
    best = {name: round(min(values), 3) for name, values in timings.items()}
    print(json.dumps({
        "benchmark": "store_scale", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"), "runs": args.runs, "seconds": best,
        "ms_per_run": {name: round(1000 * value / args.runs, 3) for name, value in best.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
