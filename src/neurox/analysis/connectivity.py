"""Functional connectivity from a store: parcel time series and correlation matrices.

An atlas (any 3D label NIfTI in MNI space, e.g. the synthetic cohort's parcels or Schaefer) is
resampled (nearest neighbour) onto the store's grid through the world coordinates of both; each
parcel's series is the mean over its in-brain voxels, frame by frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neurox.data.store import Store
from neurox.io.nifti import read_volume_ras


def atlas_on_grid(atlas_path: str | Path, grid_shape, grid_affine: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Atlas labels on the store grid (0 = none) and the labels present."""
    labels, info = read_volume_ras(atlas_path)
    source_affine = info.ras_affine
    index = np.indices(grid_shape).reshape(3, -1)
    world = grid_affine[:3, :3] @ index + grid_affine[:3, 3:4]
    source = np.linalg.inv(source_affine)[:3, :3] @ world + np.linalg.inv(source_affine)[:3, 3:4]
    source = np.round(source).astype(int)
    inside = np.all((source >= 0) & (source < np.array(labels.shape)[:, None]), axis=0)
    out = np.zeros(index.shape[1], dtype=np.int32)
    out[inside] = labels[tuple(source[:, inside])]
    out = out.reshape(grid_shape)
    present = sorted(int(v) for v in np.unique(out) if v != 0)
    if not present:
        raise ValueError(f"{atlas_path}: no atlas label falls on the store grid (is the atlas in MNI space?)")
    return out, present


def parcel_series(store: Store, run_id: str, atlas: np.ndarray, labels: list[int], block: int = 64) -> np.ndarray:
    """(frames, parcels) mean signal of each parcel's in-brain voxels."""
    reader = store.run(run_id)
    mask = store.mask(run_id)
    flat = np.where(mask, atlas, 0).ravel()
    lookup = np.zeros(flat.max() + 1, dtype=np.int64) if flat.size else np.zeros(1, dtype=np.int64)
    lookup[labels] = np.arange(1, len(labels) + 1)
    column = lookup[flat]  # 0 = not in any parcel
    counts = np.bincount(column, minlength=len(labels) + 1)[1:].astype(np.float64)
    series = np.zeros((reader.n_frames, len(labels)))
    for start in range(0, reader.n_frames, block):
        n = min(block, reader.n_frames - start)
        frames = reader.read(start, n).reshape(n, -1).astype(np.float64)
        for i in range(n):
            series[start + i] = np.bincount(column, weights=frames[i], minlength=len(labels) + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return series / counts


def correlation_matrix(series: np.ndarray, kind: str = "fisher_z") -> np.ndarray:
    """Pearson correlation between parcels (``plain``), its Fisher z (``fisher_z``), or the partial
    correlation from the precision matrix (``partial``)."""
    series = series - series.mean(0)
    std = series.std(0)
    std[std == 0] = 1.0
    z = series / std
    corr = z.T @ z / len(z)
    if kind == "partial":
        precision = np.linalg.pinv(corr)
        d = np.sqrt(np.abs(np.diag(precision)))
        d[d == 0] = 1.0
        corr = -precision / np.outer(d, d)
    np.fill_diagonal(corr, 1.0)
    if kind == "fisher_z":
        corr = np.arctanh(np.clip(corr, -0.999999, 0.999999))
        np.fill_diagonal(corr, 0.0)
    elif kind not in ("plain", "partial"):
        raise ValueError(f"unknown connectivity kind {kind!r}; choose plain, fisher_z or partial")
    return corr


def participant_connectivity(store: Store, atlas_path: str | Path, participants: list[str],
                             kind: str = "fisher_z", progress: bool = True) -> tuple[dict[str, np.ndarray], list[int]]:
    """Participant -> connectivity matrix (the mean over the participant's runs, in Fisher-z space
    when ``kind`` is fisher_z)."""
    from tqdm import tqdm

    grid = tuple(store.info["grid"])
    affine = np.array(store.run(store.run_ids[0]).attributes["affine"])
    atlas, labels = atlas_on_grid(atlas_path, grid, affine)
    runs: dict[str, list[str]] = {}
    for row in store.manifest:
        if row["status"] == "ok" and row["participant_id"] in participants:
            runs.setdefault(row["participant_id"], []).append(row["run_id"])
    matrices = {}
    for p in tqdm(sorted(runs), desc="connectivity", unit="participant", disable=not progress):
        per_run = [correlation_matrix(np.nan_to_num(parcel_series(store, r, atlas, labels)), kind) for r in runs[p]]
        matrices[p] = np.mean(per_run, axis=0)
    return matrices, labels


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(matrix.shape[0], k=1)
    return matrix[i, j]
