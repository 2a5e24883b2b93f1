"""The model grid: a box of voxels fixed in MNI coordinates, and how an input's voxels are taken onto it.

An input already on a grid that aligns with the box (same voxel size, origin a whole number of voxels away: the
usual fMRIPrep/HCP MNI outputs) is cut and padded. Onto larger voxels, each target voxel is the average of the
input voxels it covers; where the target's centres fall on every k-th input voxel (MNI 2 mm outputs onto the
4 mm box) that is a weighted sum of strided views, and anything else is interpolated (trilinear) when asked to.
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
    """Takes RAS volumes of one input onto the target grid: a cut-and-pad when the grids align,
    else trilinear (or nearest, for masks) resampling. Where the target's voxels are larger than the input's
    (2 mm runs onto a 4 mm grid, HCP's 1.6 mm 7T runs onto 2 mm), each input axis is first averaged over a
    target voxel's width: a target voxel is then the mean of the input voxels it covers, not a sample of one
    of them (whose noise, and whatever varies faster than the new grid can hold, would alias into it). Where the
    target's voxel centres fall on every k-th input voxel (the MNI 2 mm outputs of fMRIPrep and HCP onto the
    4 mm grid), that average is a weighted sum of strided views, without interpolating (and without ``resample``,
    which only interpolation needs)."""

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
        self.stride = np.round(scale).astype(int) if (  # target voxel i on input voxel offset + stride * i
            not self.aligned and np.allclose(linear, np.diag(scale), atol=1e-3) and (scale > 1.5).all()
            and np.allclose(scale, np.round(scale), atol=1e-3) and np.allclose(offset, np.round(offset), atol=1e-3)
        ) else None
        if not self.aligned and self.stride is None and not resample:  # averaging over strided views is no guess
            raise InputError(
                f"{info.path}: its voxel grid ({format_mm(zooms)} mm, origin {format_mm(source_affine[:3, 3])}) does "
                f"not align with the {grid.voxel_size_mm} mm target grid; pass --resample to interpolate"
            )

    def __call__(self, volume: np.ndarray, fill: float = 0.0, nearest: bool = False) -> np.ndarray:
        """(x, y, z[, n]) in source RAS -> (X, Y, Z[, n]) on the target grid."""
        if self.aligned:
            return self._cut(volume, fill)
        if self.stride is not None:
            return self._strided(volume, fill, nearest)
        from scipy.ndimage import affine_transform, correlate1d

        extra = volume.shape[3:]
        flat = volume.reshape(*volume.shape[:3], -1)
        out = np.empty((*self.grid.shape, flat.shape[3]), dtype=volume.dtype)
        for i in range(flat.shape[3]):
            frame = flat[..., i]
            for axis, weights in enumerate(self.averaging):
                if weights is not None and not nearest:
                    frame = correlate1d(frame, weights, axis=axis, mode="nearest")
            out[..., i] = affine_transform(frame, self.matrix[:3, :3], self.matrix[:3, 3],
                                           output_shape=self.grid.shape, order=0 if nearest else 1, cval=fill)
        return out.reshape(*self.grid.shape, *extra)

    def _strided(self, volume: np.ndarray, fill: float, nearest: bool) -> np.ndarray:
        """The target voxels that fall on input voxels, each the weighted sum (``averaging``) of the input voxels
        around it (the input's edge voxel repeated past its edge, as the interpolating path does); the rest
        ``fill``. One axis at a time: each sum is over views ``stride`` apart, and shrinks what the next reads."""
        out = np.full((*self.grid.shape, *volume.shape[3:]), fill, dtype=volume.dtype, order="F")
        kept, inside = volume, []
        for axis in range(3):
            k, start, n_source = self.stride[axis], self.offset[axis], self.source_shape[axis]
            lo = max(0, -(start // k))  # the first target voxel whose centre is an input voxel: start + k lo >= 0
            hi = min(self.grid.shape[axis], (n_source - 1 - start) // k + 1)
            if hi <= lo:
                return out  # no overlap at all
            weights = [1.0] if nearest or self.averaging[axis] is None else self.averaging[axis]
            half = len(weights) // 2
            if half:  # the edge voxel repeated past the edge; index i of ``kept`` is i + half of ``padded``
                widths = [(0, 0)] * kept.ndim
                widths[axis] = (half, half)
                kept = np.pad(kept, widths, mode="edge")
            total = None
            for j, weight in enumerate(weights):  # the input voxels j - half away from each target voxel's centre
                first = start + k * lo + j  # in padded indices
                view = kept[(slice(None),) * axis + (slice(first, first + k * (hi - lo - 1) + 1, k),)]
                if len(weights) == 1:
                    total = view
                else:
                    part = view * view.dtype.type(weight)
                    total = part if total is None else np.add(total, part, out=total)
            kept = total
            inside.append(slice(lo, hi))
        out[tuple(inside)] = kept
        return out

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
