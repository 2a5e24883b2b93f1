"""Finding an fMRIPrep cohort's runs: ``prepare``'s walk against listing every file under the folder.

Makes an fMRIPrep-shaped folder of empty files (per participant: one MNI-space run and 20 other files in
``func/``, 30 in ``anat/``, 15 in ``figures/``, and FreeSurfer's seven folders of 25 files each in
``sourcedata/freesurfer/``, as fMRIPrep 21 and later lays them out), then times ``neurox.io.bids.preprocessed_bolds``
(which does not walk into folders that hold no runs) against ``Path.rglob`` over everything (what it replaced),
each on a warm cache, best of three. Prints one JSON document.

    python benchmarks/discover.py --workdir /tmp/neurox-bench-discover --participants 1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def make_tree(root: Path, participants: int) -> int:
    """The folder (kept between runs); returns how many files it holds."""
    marker = root / f".made-{participants}"
    if not marker.exists():
        for i in range(participants):
            sub = f"sub-{i:05d}"
            folders = {root / sub / "func": 20, root / sub / "anat": 30, root / sub / "figures": 15}
            folders.update({root / "sourcedata" / "freesurfer" / sub / d: 25
                            for d in ("mri", "surf", "label", "stats", "scripts", "touch", "tmp")})
            for folder, count in folders.items():
                folder.mkdir(parents=True, exist_ok=True)
                for k in range(count):
                    (folder / f"{sub}_file{k}").touch()
            (root / sub / "func" / f"{sub}_task-rest_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.nii.gz").touch()
        marker.touch()
    return sum(len(files) for _, _, files in os.walk(root))


def best_of(function, repeats: int = 3) -> tuple[float, int]:
    times, found = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        found = len(function())
        times.append(time.perf_counter() - start)
    return round(min(times), 3), found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/neurox-bench-discover")
    parser.add_argument("--participants", type=int, default=1000)
    args = parser.parse_args()
    from neurox.io.bids import preprocessed_bolds

    root = Path(args.workdir) / f"fmriprep-{args.participants}"
    files = make_tree(root, args.participants)
    from neurox.io.bids import may_hold_runs

    listed = 0  # the files in the folders the walk lists (a cluster file system's cost grows with them)
    for _, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if may_hold_runs(name)]
        listed += len(names)
    walk_s, walk_found = best_of(lambda: preprocessed_bolds(root))
    rglob_s, rglob_found = best_of(lambda: sorted(root.rglob("*_desc-preproc_bold.nii*")))
    print(json.dumps({
        "benchmark": "discover", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"), "participants": args.participants, "files": files,
        "files_in_folders_walked": listed,
        "walk_s": walk_s, "walk_runs_found": walk_found, "rglob_s": rglob_s, "rglob_runs_found": rglob_found,
        "rglob_over_walk": round(rglob_s / walk_s, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
