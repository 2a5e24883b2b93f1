"""Data path: prepare throughput and peak memory, window reads per second, bytes on disk.

Makes HCP/UKB-shaped inputs (MNI152NLin6Asym 2 mm grid, 91x109x91, float32, gzipped) of 600 and
1,200 frames with BOLD-like content on the MNI152 brain, prepares each in a fresh process (peak
resident memory of that process is reported), then reads random 20-frame windows through neurox's
loader with 1 and 2 worker threads (warm page cache), and compares the store's bytes with float16
frames stored one file each (the published layout). Each run is prepared a second time with
``--confounds simple`` (an fMRIPrep-style table of 24 motion parameters, white matter, CSF and the
cosine drift basis, regressed out of every voxel), and a third time laid out as an HCP-pipeline run
(``Movement_Regressors.txt`` and a ``wmparc.2.nii.gz`` from the MNI152 tissue masks) with ``--confounds
compcor``: prepare then computes the tissue signals, CompCor and the cosines from the frames (one more
pass) before regressing them out; and without denoising, where they are computed in the first pass and
only stored. Last, each run is prepared resampled in time (``--resample_tr``) from its 0.72 s to ABCD's 0.8 s and
to 2 s. Prints one JSON document.

    python benchmarks/data.py --workdir /tmp/neurox-bench
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

import numpy as np

GRID = (91, 109, 91)
AFFINE = np.array([[2.0, 0, 0, -90.0], [0, 2.0, 0, -126.0], [0, 0, 2.0, -72.0], [0, 0, 0, 1.0]])


def make_input(path: Path, n_frames: int, seed: int = 0, grid=GRID, affine=AFFINE) -> Path:
    """A gzipped float32 run: tissue baseline, slow low-rank signals and white noise in the brain (on the MNI 2 mm
    grid unless ``grid`` and ``affine`` say otherwise)."""
    from nilearn.datasets import load_mni152_brain_mask
    from nilearn.image import resample_img
    from scipy.ndimage import gaussian_filter

    from neurox.data.synthetic import band_limited, write_image, write_nifti_streaming

    if path.exists():
        return path
    mask_img = resample_img(load_mni152_brain_mask(resolution=2), target_affine=affine, target_shape=grid,
                            interpolation="nearest", force_resample=True, copy_header=True)
    mask = mask_img.get_fdata() > 0
    rng = np.random.default_rng(seed)
    baseline = (1000 * (1 + 0.1 * gaussian_filter(rng.standard_normal(grid), 3.0) * 10) * mask).astype(np.float32)
    maps = np.stack([gaussian_filter(rng.standard_normal(grid), 4.0) for _ in range(12)], -1).astype(np.float32)
    maps *= 10 / maps.std()
    signals = np.stack([band_limited(rng, n_frames, 0.72, 0.01, 0.1) for _ in range(12)]).astype(np.float32)

    def blocks():
        for start in range(0, n_frames, 32):
            stop = min(start + 32, n_frames)
            frames = baseline[..., None] + maps @ signals[:, start:stop]
            frames += 10 * rng.standard_normal(frames.shape, dtype=np.float32)
            yield frames * mask[..., None]

    write_nifti_streaming(path, affine, (*grid, n_frames), 0.72, blocks())
    write_image(path.with_name(path.name.replace("_bold", "_mask")), mask.astype(np.uint8), affine)
    return path


def confounds_table(path: Path, n_frames: int, tr: float = 0.72, seed: int = 0) -> Path:
    """What ``--confounds simple`` reads: fMRIPrep's columns, random values of the right kind."""
    from neurox.data.confounds import MOTION, confounds_text

    rng = np.random.default_rng(seed)
    table = {}
    for name in MOTION:
        values = np.cumsum(0.01 * rng.standard_normal(n_frames))
        difference = np.concatenate([[np.nan], np.diff(values)])
        table.update({name: values, f"{name}_derivative1": difference, f"{name}_power2": values**2,
                      f"{name}_derivative1_power2": difference**2})
    table["white_matter"], table["csf"] = rng.standard_normal((2, n_frames))
    frames = np.arange(n_frames)
    for k in range(1, int(2 * n_frames * tr / 128) + 1):
        table[f"cosine{k - 1:02d}"] = np.sqrt(2 / n_frames) * np.cos(np.pi * (2 * frames + 1) * k / (2 * n_frames))
    path.write_text(confounds_text(table))
    return path


def hcp_layout(source: Path, root: Path, n_frames: int, seed: int = 0) -> Path:
    """``source`` as an HCP-pipeline run (linked, not copied), with head motion and a label volume whose white
    matter and grey matter are the MNI152 templates' (2 and 3) and CSF the rest of the brain mask (24)."""
    from nilearn.datasets import load_mni152_gm_mask, load_mni152_wm_mask
    from nilearn.image import resample_img

    from neurox.data.synthetic import write_image

    run = root / "100307" / "MNINonLinear" / "Results" / "rfMRI_REST1_LR"
    run.mkdir(parents=True, exist_ok=True)
    for name, target in (("rfMRI_REST1_LR.nii.gz", source),
                         ("brainmask_fs.2.nii.gz", source.with_name(source.name.replace("_bold", "_mask")))):
        if not (run / name).exists():
            (run / name).symlink_to(target.resolve())
    rng = np.random.default_rng(seed)
    motion = np.cumsum(0.01 * rng.standard_normal((n_frames, 6)), axis=0)
    np.savetxt(run / "Movement_Regressors.txt", np.column_stack([motion, np.diff(motion, axis=0, prepend=0)]),
               fmt="  %.6f")
    brain = nib_data(run / "brainmask_fs.2.nii.gz") > 0

    def on_grid(img):
        return resample_img(img, target_affine=AFFINE, target_shape=GRID, interpolation="nearest",
                            force_resample=True, copy_header=True).get_fdata() > 0

    white, grey = on_grid(load_mni152_wm_mask(resolution=2)), on_grid(load_mni152_gm_mask(resolution=2))
    labels = np.where(brain, 24, 0)
    labels[brain & grey] = 3
    labels[brain & white] = 2
    write_image(root / "100307" / "MNINonLinear" / "ROIs" / "wmparc.2.nii.gz", labels.astype(np.int32), AFFINE)
    return root


def nib_data(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asanyarray(nib.load(str(path)).dataobj)


def prepare_in_child(source: Path, out: Path, confounds: str = "none", resample_tr: float | None = None,
                     voxel_size: float = 2.0, resample: bool = False) -> dict:
    """``voxel_size``: the target grid's; ``resample``: interpolate an input that does not align with it."""
    code = (
        "import sys, time, resource;"
        "from neurox.data.prepare import prepare;"
        "from neurox.data.grid import TargetGrid;"
        "from neurox.data.preprocess import PrepareOptions;"
        "t = time.perf_counter();"
        "tr = float(sys.argv[4]) or None;"
        "v = float(sys.argv[5]);"
        "o = PrepareOptions(TargetGrid.default(v), confounds=sys.argv[3], resample_tr=tr, resample=sys.argv[6] == '1');"
        "r = prepare(sys.argv[1], sys.argv[2], o, progress=False);"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, r.ok);"
        "sys.stderr.write(str(r.failed))"
    )
    if source.is_file():  # a manifest gives the mask (and the confounds) explicitly (the file names are not BIDS)
        manifest = source.with_suffix("").with_suffix(".tsv")
        table = source.with_name(source.name.replace("_bold.nii.gz", "_confounds.tsv"))
        manifest.write_text(f"participant_id\tpath\tmask\tconfounds\nsub-bench\t{source.name}\t"
                            f"{source.name.replace('_bold', '_mask')}\t{table.name}\n")
        source = manifest
    done = subprocess.run([sys.executable, "-c", code, str(source), str(out), confounds, str(resample_tr or 0),
                           str(voxel_size), "1" if resample else "0"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    seconds, max_rss_kib, ok = done.stdout.split()
    if ok != "True":
        raise RuntimeError(f"prepare {source} failed: {done.stderr}")
    return {"seconds": round(float(seconds), 2), "peak_rss_gib": round(int(max_rss_kib) / 2**20, 3), "ok": ok == "True"}


def window_reads(store_path: Path, workers: int, n_windows: int = 300, length: int = 20) -> float:
    """Random 20-frame windows per second through neurox's loader (worker threads), warm cache."""
    from neurox.data.loader import ThreadedLoader
    from neurox.data.store import Store

    store = Store(store_path)
    run_id = store.run_ids[0]
    n = store.run(run_id).n_frames

    class RandomWindows:  # what the training loader reads: (C, T, X, Y, Z) float16
        def __getitem__(self, i):
            start = int(np.random.default_rng(i).integers(0, n - length))
            return store.read_frames(run_id, start, length)

    loader = ThreadedLoader(RandomWindows(), range(n_windows), batch_size=1, workers=workers)
    for _ in loader:  # warm the page cache
        pass
    start = time.perf_counter()
    count = sum(1 for _ in loader)
    return round(count / (time.perf_counter() - start), 1)


def store_bytes(store_path: Path) -> int:
    return sum(p.stat().st_size for p in (store_path / "runs").rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/neurox-bench-data")
    parser.add_argument("--frames", type=int, nargs="+", default=[600, 1200])
    args = parser.parse_args()
    from neurox.data.store import Store
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for n in args.frames:
        source = make_input(work / f"run{n}_bold.nii.gz", n)
        confounds_table(work / f"run{n}_confounds.tsv", n)
        out = work / f"store{n}"
        for old in (out, work / f"store{n}-simple", work / f"store{n}-hcp", work / f"store{n}-hcp-compcor",
                    work / f"store{n}-tr0.8", work / f"store{n}-tr2"):
            if old.exists():
                import shutil

                shutil.rmtree(old)
        prep = prepare_in_child(source, out)
        denoised = prepare_in_child(source, work / f"store{n}-simple", confounds="simple")
        hcp_input = hcp_layout(source, work / f"hcp{n}", n)
        hcp_plain = prepare_in_child(hcp_input, work / f"store{n}-hcp", "none")  # tissue signals in the first pass
        hcp = prepare_in_child(hcp_input, work / f"store{n}-hcp-compcor", "compcor")
        in_time = {tr: prepare_in_child(source, work / f"store{n}-tr{tr:g}", resample_tr=tr) for tr in (0.8, 2.0)}
        frame_bytes = 96 * 96 * 96 * 2
        ours = store_bytes(out)
        results[f"{n}_frames"] = {
            "input_gib": round(source.stat().st_size / 2**30, 3),
            "prepare_s": prep["seconds"],
            "frames_per_s": round(n / prep["seconds"], 1),
            "peak_rss_gib": prep["peak_rss_gib"],
            "store_bytes": ours,
            "one_file_per_frame_float16_bytes": n * frame_bytes,
            "bytes_ratio": round(ours / (n * frame_bytes), 3),
            "files_per_run": sum(1 for p in (out / "runs").rglob("*") if p.is_file()),
            "confounds_simple": {"prepare_s": denoised["seconds"], "frames_per_s": round(n / denoised["seconds"], 1),
                                 "peak_rss_gib": denoised["peak_rss_gib"],
                                 "regressors": 26 + int(2 * n * 0.72 / 128)},
            "hcp_confounds_none": {"prepare_s": hcp_plain["seconds"], "peak_rss_gib": hcp_plain["peak_rss_gib"]},
            "hcp_confounds_compcor": {"prepare_s": hcp["seconds"], "frames_per_s": round(n / hcp["seconds"], 1),
                                      "peak_rss_gib": hcp["peak_rss_gib"],
                                      "regressors": 24 + 5 + int(2 * n * 0.72 / 128)},
            **{f"resample_tr_{tr:g}": {"prepare_s": r["seconds"], "peak_rss_gib": r["peak_rss_gib"],
                                       "frames_out": Store(work / f"store{n}-tr{tr:g}").manifest[0]["n_frames"]}
               for tr, r in in_time.items()},
        }
    largest = work / f"store{max(args.frames)}"
    results["window_reads_per_s"] = {f"{w}_workers": window_reads(largest, w) for w in (1, 2)}
    print(json.dumps({
        "benchmark": "data", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"), "grid_in": GRID, "grid_out": [96, 96, 96],
        "results": results, "self_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
