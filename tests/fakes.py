"""Tiny fMRI runs for tests: a brain-shaped blob where MNI brains sit, on a 4 mm grid that aligns
with neurox's 4 mm target box, written as real NIfTI files."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from neurox.data.grid import TargetGrid
from neurox.data.preprocess import PrepareOptions

SHAPE = (40, 48, 40)
AFFINE = np.array([[4.0, 0, 0, -80.0], [0, 4.0, 0, -116.0], [0, 0, 4.0, -66.0], [0, 0, 0, 1]])
OPTIONS = PrepareOptions(grid=TargetGrid.default(4.0), min_frames=8)


def brain_mask() -> np.ndarray:
    idx = np.indices(SHAPE).reshape(3, -1).T
    world = idx @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    inside = (((world - [0, -20, 10]) / [60, 80, 55]) ** 2).sum(1) <= 1
    return inside.reshape(SHAPE)


def bold(n_frames: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = brain_mask()
    data = 1000 + 20 * rng.standard_normal((*SHAPE, n_frames)) + np.linspace(0, 50, SHAPE[0])[:, None, None, None]
    return (data * mask[..., None]).astype(np.float32)


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    if data.ndim == 4:
        img.header.set_zooms((4.0, 4.0, 4.0, 2.0))
    nib.save(img, str(path))
    return path


def bids_run(root: Path, sub: str, n_frames: int = 24, seed: int = 0, space: str = "MNI152NLin2009cAsym",
             data: np.ndarray | None = None, mask: np.ndarray | None = None) -> Path:
    func = root / f"sub-{sub}" / "func"
    stem = f"sub-{sub}_task-rest_run-1_space-{space}_res-4"
    path = save(func / f"{stem}_desc-preproc_bold.nii.gz", bold(n_frames, seed) if data is None else data)
    save(func / f"{stem}_desc-brain_mask.nii.gz", (brain_mask() if mask is None else mask).astype(np.uint8))
    (func / f"{stem}_desc-preproc_bold.json").write_text('{"RepetitionTime": 2.0}')
    return path


def three_parcel_atlas(folder: Path) -> Path:
    """A label image of three blocks inside the brain blob, on the runs' grid."""
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[5:20, 10:25, 10:20], labels[20:35, 10:25, 10:20], labels[10:30, 25:40, 20:30] = 1, 2, 3
    save(folder / "atlas.nii.gz", labels)
    return folder / "atlas.nii.gz"


def truncate_gzip(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def as_las(path: Path, out: Path) -> Path:
    """The same image stored left-to-right flipped, with the affine saying so."""
    img = nib.load(str(path))
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = img.shape[0] - 1
    data = np.asanyarray(img.dataobj)[::-1]
    return save(out, np.ascontiguousarray(data), img.affine @ flip)


def gz_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def free_port() -> int:
    """A TCP port no one listens on now, for a launcher's rendezvous: tests that run at once never share one."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    """The environment for a neurox subprocess in tests: one thread each, unbuffered, no GPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_until_step_then_signal(args: list[str], run_dir: Path, step: int,
                               signum: int = signal.SIGTERM) -> tuple[int, str]:
    """Start ``neurox ARGS`` in a process, send it ``signum`` once ``run_dir/metrics.jsonl`` logs ``step``, and
    return its exit status and its output (standard output, then standard error). The process takes Ctrl-C as in
    a terminal, even where the tests run as a background job (which ignores it)."""
    process = subprocess.Popen([sys.executable, "-m", "neurox.cli", *args], env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if log.is_file() and f'"step": {step},' in log.read_text():
            process.send_signal(signum)
            break
        time.sleep(0.01)
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stdout + stderr


N_SUBJECTS = 10


def cohort_store(tmp_path_factory) -> Path:
    """A prepared store of N_SUBJECTS tiny runs with a weak local effect of ``group``, and phenotypes to split,
    adjust and select by: score, site (a, b, c in turn), education (one n/a), family (five of two siblings),
    cohort (two patients); sub-99 has a row but no runs."""
    from neurox.data.prepare import prepare

    root = tmp_path_factory.mktemp("cohort")
    rows = ["participant_id\tgroup\tscore\tsite\teducation\tfamily\tcohort"]
    for i in range(N_SUBJECTS):
        group = i % 2
        data = bold(n_frames=40, seed=i)
        data[10:20, 20:30, 15:25] *= 1.0 + 0.05 * group  # a weak local effect
        bids_run(root, f"{i:02d}", data=data)
        rows.append(f"sub-{i:02d}\t{group}\t{i * 1.5 + 20}\t{['a', 'b', 'c'][i % 3]}\t{'n/a' if i == 3 else 10 + i}"
                    f"\tF{i // 2}\t{'patient' if i in (4, 5) else 'control'}")
    rows.append("sub-99\t1\t3.0\ta\t40\tF9\tcontrol")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path_factory.mktemp("store") / "store"
    assert prepare(root, out, OPTIONS, progress=False).ok
    return out


def finetune_args(store: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--store", str(store), "--target", "group", "--out", str(out), "--epochs", "2",
            "--batch_size", "2", "--n_boot", "50", "--loader_workers", "0", "--deterministic", "true", *extra]
