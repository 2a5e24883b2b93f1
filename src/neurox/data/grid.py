"""The model grid: a box of voxels fixed in MNI coordinates, and how an input's voxels are taken onto it.

An input already on a grid that aligns with the box (same voxel size, origin a whole number of voxels away: the
usual fMRIPrep/HCP MNI outputs) is cut and padded. Onto larger voxels, each target voxel is the average of the
input voxels it covers (MNI 2 mm outputs onto the 4 mm box need nothing else); any other grid is interpolated
(trilinear) when asked to, one axis at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurox.config import MNI_BOX_MM, MNI_BOX_ORIGIN_MM
from neurox.io.nifti import InputError, NiftiInfo


@dataclass(frozen=True)
class TargetGrid:
    """A box of voxels fixed in MNI (RAS, mm) coordinates: ``origin_mm`` is the centre of voxel 0."""

    shape: tuple[int, int, int] = (96, 96, 96)
    voxel_size_mm: float = 2.0
    origin_mm: tuple[float, float, float] = MNI_BOX_ORIGIN_MM

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([self.voxel_size_mm] * 3 + [1.0])
        affine[:3, 3] = self.origin_mm
        return affine

    @property
    def crop_box_mm(self) -> list[list[float]]:
        """World coordinates of the first and last voxel centres on each axis."""
        return [[o, o + (n - 1) * self.voxel_size_mm] for o, n in zip(self.origin_mm, self.shape)]

    @classmethod
    def default(cls, voxel_size_mm: float = 2.0, shape=None) -> TargetGrid:
        """96^3 at 2 mm (192 mm a side, the MNI152 brain with margin); 48^3 at 4 mm, same box."""
        if shape is None:
            shape = tuple(int(round(MNI_BOX_MM / voxel_size_mm)) for _ in range(3))
        return cls(tuple(int(s) for s in shape), float(voxel_size_mm))


class GridMapping:
    """Takes RAS volumes of one input onto the target grid: a cut-and-pad when the grids align, else trilinear (or
    nearest, for masks) resampling. Where the target's voxels are larger than the input's (2 mm runs onto the 4 mm
    grid, HCP's 1.6 mm 7T runs onto 2 mm), each input axis is first averaged over a target voxel's width: a target
    voxel is then the mean of the input voxels it covers, not a sample of one of them (whose noise, and whatever
    varies faster than the new grid can hold, would alias into it).

    Grids whose axes are parallel (every MNI output) are resampled one axis at a time, each axis a small
    (target voxels x input voxels) matrix of weights applied to a block of frames by one matrix product: a 3 mm
    run onto the 2 mm grid prepares 6 times faster than interpolating each frame in 3D (docs/performance.md).
    Where the target's centres fall on input centres (the MNI 2 mm outputs onto the 4 mm grid) nothing is
    interpolated, only averaged, and ``resample`` is not needed."""

    def __init__(self, info: NiftiInfo, grid: TargetGrid, resample: bool):
        self.grid = grid
        source_affine = info.ras_affine
        self.source_shape = info.ras_shape
        # target voxel index -> source voxel index
        self.matrix = np.linalg.inv(source_affine) @ grid.affine
        linear, offset = self.matrix[:3, :3], self.matrix[:3, 3]
        self.aligned = np.allclose(linear, np.eye(3), atol=1e-3) and np.allclose(offset, np.round(offset), atol=1e-3)
        self.offset = np.round(offset).astype(int)
        zooms = np.sqrt((source_affine[:3, :3] ** 2).sum(0))
        self.averaging = [box_weights(grid.voxel_size_mm / zoom) for zoom in zooms]  # per input axis; None: finer
        scale = np.diag(linear)
        self.separable = bool(np.allclose(linear, np.diag(scale), atol=1e-3))
        on_centres = (self.separable and (scale > 0.5).all() and np.allclose(scale, np.round(scale), atol=1e-3)
                      and np.allclose(offset, np.round(offset), atol=1e-3))
        self.interpolates = not self.aligned and not on_centres
        self._weights: dict[bool, list[tuple[np.ndarray, np.ndarray]]] = {}  # nearest -> per axis, made once
        if self.interpolates and not resample:
            raise InputError(
                f"{info.path}: its voxel grid ({format_mm(zooms)} mm, origin {format_mm(source_affine[:3, 3])}) does "
                f"not align with the {grid.voxel_size_mm} mm target grid; pass --resample to interpolate"
            )

    def __call__(self, volume: np.ndarray, fill: float = 0.0, nearest: bool = False) -> np.ndarray:
        """(x, y, z[, n]) in source RAS -> (X, Y, Z[, n]) on the target grid, in Fortran order."""
        if self.aligned:
            return self._cut(volume, fill)
        if self.separable:
            return self._by_axis(volume, fill, nearest)
        return self._interpolated(volume, fill, nearest)

    def _by_axis(self, volume: np.ndarray, fill: float, nearest: bool) -> np.ndarray:
        """One matrix product per axis on the whole block. The block's Fortran order (x fastest) is a C-ordered
        (t, z, y, x) array: each product below reads and writes C-ordered arrays, with no transposing copy."""
        if nearest not in self._weights:
            self._weights[nearest] = [
                axis_weights(n_target, n_source, self.matrix[axis, axis], self.matrix[axis, 3],
                             None if nearest else self.averaging[axis], nearest)
                for axis, (n_target, n_source) in enumerate(zip(self.grid.shape, self.source_shape))]
        (wx, inside_x), (wy, inside_y), (wz, inside_z) = self._weights[nearest]
        x, y, z = volume.shape[:3]
        extra = volume.shape[3:]
        t = int(np.prod(extra))
        X, Y, Z = self.grid.shape
        frames = np.asfortranarray(volume, dtype=np.float32).reshape(x, y, z, t, order="F").T  # (t, z, y, x)
        out = (frames.reshape(-1, x) @ wx.T).reshape(t, z, y, X)
        out = np.matmul(wy, out.reshape(t * z, y, X)).reshape(t, z, Y, X)
        out = np.matmul(wz, out.reshape(t, z, Y * X)).reshape(t, Z, Y, X)
        out[:, ~inside_z] = fill
        out[:, :, ~inside_y] = fill
        out[:, :, :, ~inside_x] = fill
        out = out.T.reshape(X, Y, Z, *extra, order="F")
        if nearest or not np.issubdtype(volume.dtype, np.floating):
            return np.rint(out).astype(volume.dtype)
        return out.astype(volume.dtype, copy=False)

    def _interpolated(self, volume: np.ndarray, fill: float, nearest: bool) -> np.ndarray:
        """An input whose axes are not parallel to the grid's (oblique): each frame averaged along its own axes,
        then interpolated in 3D."""
        from scipy.ndimage import affine_transform, correlate1d

        extra = volume.shape[3:]
        flat = volume.reshape(*volume.shape[:3], -1)
        out = np.empty((*self.grid.shape, flat.shape[3]), dtype=volume.dtype, order="F")
        for i in range(flat.shape[3]):
            frame = flat[..., i]
            for axis, weights in enumerate(self.averaging):
                if weights is not None and not nearest:
                    frame = correlate1d(frame, weights, axis=axis, mode="nearest")
            out[..., i] = affine_transform(frame, self.matrix[:3, :3], self.matrix[:3, 3],
                                           output_shape=self.grid.shape, order=0 if nearest else 1, cval=fill)
        return out.reshape(*self.grid.shape, *extra, order="F")

    def _cut(self, volume: np.ndarray, fill: float) -> np.ndarray:
        # Fortran order, like the frames read from NIfTI: the copy below streams, it does not transpose
        out = np.full((*self.grid.shape, *volume.shape[3:]), fill, dtype=volume.dtype, order="F")
        src, dst = [], []
        for n_target, n_source, start in zip(self.grid.shape, self.source_shape, self.offset):
            lo, hi = max(start, 0), min(start + n_target, n_source)
            if hi <= lo:
                return out  # no overlap at all
            src.append(slice(lo, hi))
            dst.append(slice(lo - start, hi - start))
        out[tuple(dst)] = volume[tuple(src)]
        return out


def axis_weights(n_target: int, n_source: int, scale: float, offset: float, averaging: np.ndarray | None,
                 nearest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis: (target voxels, input voxels) float32 weights taking target voxel i from the input at
    ``offset + scale * i`` (linearly interpolated, or the nearest voxel; after ``averaging``, the input's edge
    voxel repeated past its edge), and which target voxels fall inside the input (the others are filled)."""
    position = offset + scale * np.arange(n_target)
    inside = (position > -1e-3) & (position < n_source - 1 + 1e-3)
    position = np.clip(position, 0, n_source - 1)
    rows = np.arange(n_target)
    weights = np.zeros((n_target, n_source))
    if nearest:
        weights[rows, np.floor(position + 0.5).astype(int)] = 1.0
    else:
        below = np.floor(position).astype(int)
        above = np.minimum(below + 1, n_source - 1)
        np.add.at(weights, (rows, below), 1 - (position - below))
        np.add.at(weights, (rows, above), position - below)
        if averaging is not None:
            half = len(averaging) // 2
            box = np.zeros((n_source, n_source))
            for k, weight in enumerate(averaging):
                np.add.at(box, (np.arange(n_source), np.clip(np.arange(n_source) + k - half, 0, n_source - 1)), weight)
            weights = weights @ box
    weights[~inside] = 0.0
    return weights.astype(np.float32), inside


def box_weights(ratio: float) -> np.ndarray | None:
    """The weights, at whole voxel offsets, of an average over ``ratio`` voxels centred on a voxel (each voxel
    weighted by the part of it inside): [0.25, 0.5, 0.25] for 2, [0.1, 0.8, 0.1] for 1.25; None at 1 or less."""
    if ratio <= 1 + 1e-6:
        return None
    half = ratio / 2
    offsets = np.arange(-int(np.ceil(half - 0.5)), int(np.ceil(half - 0.5)) + 1)
    weights = np.clip(np.minimum(offsets + 0.5, half) - np.maximum(offsets - 0.5, -half), 0, None)
    return weights / weights.sum()


def format_mm(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in np.round(np.asarray(values, dtype=float), 1)) + ")"
