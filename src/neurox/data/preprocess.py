"""One run, NIfTI to normalised float16 frames on the model grid, streaming.

Two passes over the file, each one block of frames at a time: the first accumulates per-voxel sums
(for the mask when none is given, and for the normalisation statistics) and checks every value is
finite; the second normalises and writes. Memory is a few blocks of frames whatever the run length.
Denoising (``confounds``) adds no pass: the first also sums each voxel's products with the centred
regressors, which is all a least-squares fit needs, and the second subtracts the fit (memory: k
regressors x the grid, in float64 while summing). Only a regressor the frames themselves must give (the
tissue signals of an HCP run, whose table has motion only) costs a pass before the first.

The model grid is a box fixed in MNI coordinates (``neurox.data.grid``), so every subject lands on the
same voxels: each block of frames is cut onto it (or averaged, or interpolated where asked to) as it is
read. Leading non-steady-state frames (marked in its confounds table, else found in its first frames) are left
out. Resampling in time onto another TR (``resample_tr``, ``neurox.data.temporal``) comes last, after denoising
and normalisation at the run's own TR, in the second pass.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neurox import __version__
from neurox.data.confounds import (
    CONFOUNDS_FILE,
    NON_STEADY_STATE,
    confounds_text,
    denoising_name,
    drop_leading,
    input_design,
    leading_non_steady,
    motion_summary,
    run_confounds,
)
from neurox.data.grid import GridMapping, TargetGrid, format_mm
from neurox.data.store import pack_mask
from neurox.data.temporal import TemporalResampler, differs, output_frames, resample_table
from neurox.data.tissue import FrameSignals, cosine_basis, tissue_masks
from neurox.io.bids import RunSpec, is_mni_space, sidecar_of
from neurox.io.nifti import InputError, NiftiInfo, iter_frame_blocks, read_first_frames, read_info, read_volume_ras

NORMALIZATIONS = ("global_zscore", "voxel_zscore", "voxel_center")
# MNI152 brain centroid (mm); an input whose brain lies far from it is not in MNI space
MNI_BRAIN_CENTROID = np.array([0.0, -22.0, 10.0])
MNI_CENTROID_TOLERANCE_MM = 30.0


@dataclass(frozen=True)
class PrepareOptions:
    grid: TargetGrid = field(default_factory=TargetGrid)
    normalization: str = "global_zscore"
    resample: bool = False
    min_frames: int = 20
    block_frames: int = 32
    tr: float | None = None  # used where neither a sidecar nor the header gives one
    confounds: str = "none"  # regressed out of every voxel before normalising: none, simple or compcor
    global_signal: bool = False  # the global signal regressed out too
    resample_tr: float | None = None  # every run resampled in time onto this TR (s); None: each keeps its own
    # a run's leading non-steady-state frames (its confounds mark them, else its frames show them): drop or keep;
    # None: as the store already holds them, else drop (``neurox.data.prepare`` decides before any run is read)
    non_steady_state: str | None = None
    bold_desc: str = "preproc"  # the desc- of the runs read from an fMRIPrep-layout folder (smoothAROMAnonaggr, ...)

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; choose one of {', '.join(NORMALIZATIONS)}")
        if self.resample_tr is not None and not self.resample_tr > 0:
            raise ValueError(f"--resample_tr {self.resample_tr}: give a repetition time in seconds, above 0")
        denoising_name(self.confounds, self.global_signal)  # refuses a strategy prepare cannot apply
        if not re.fullmatch(r"[A-Za-z0-9]+", self.bold_desc):
            raise ValueError(f"--desc {self.bold_desc}: a BIDS desc label, letters and digits (preproc, "
                             "smoothAROMAnonaggr)")
        if self.non_steady_state not in (None, *NON_STEADY_STATE):
            raise ValueError(f"--non_steady_state {self.non_steady_state}: choose {' or '.join(NON_STEADY_STATE)}")

    @property
    def denoising(self) -> str:
        return denoising_name(self.confounds, self.global_signal)

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid": list(self.grid.shape), "voxel_size_mm": self.grid.voxel_size_mm,
            "origin_mm": list(self.grid.origin_mm), "crop_box_mm": self.grid.crop_box_mm,
            "normalization": self.normalization, "resample": self.resample, "min_frames": self.min_frames,
            "denoising": self.denoising, "resample_tr": self.resample_tr, "non_steady_state": self.non_steady_state,
            "bold_desc": self.bold_desc,
        }


@dataclass
class PreparedRun:
    n_frames: int
    attributes: dict[str, Any]


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_run(spec: RunSpec, options: PrepareOptions, writer_factory) -> PreparedRun:
    """Preprocess one run; ``writer_factory(n_frames)`` gives the ``RunWriter`` to fill."""
    if not is_mni_space(spec.space):
        raise InputError(f"{spec.bold}: not in MNI space (space-{spec.space}); give the MNI-space output")
    info = read_info(spec.bold)
    if len(info.shape) < 4:
        raise InputError(f"{spec.bold}: a {len(info.shape)}D image, not a 4D fMRI run")
    confounds = {}  # checked before the frames are read: a table that does not fit fails the run at once
    if spec.confounds is not None:
        confounds = run_confounds(spec.confounds, info.n_frames, spec.bold.name)
    # leading non-steady-state frames (brighter while the magnetisation settles) are left out of the store and
    # its table: from here on, frame 0 is the first one kept
    first = leading_frames_to_drop(spec, info) if options.non_steady_state != "keep" else 0
    n = info.n_frames - first
    if n < options.min_frames:
        dropped = f" after its {first} leading non-steady-state frame(s)" if first else ""
        raise InputError(f"{spec.bold}: {n} frames{dropped}, fewer than one window ({options.min_frames})")
    confounds = drop_leading(confounds, first)
    mapping = GridMapping(info, options.grid, options.resample)
    grid_shape = options.grid.shape

    given_mask = None
    if spec.mask is not None:
        given_mask = _volume_on_run_grid(spec.mask, info, spec.bold) > 0
        if not given_mask.any():
            raise InputError(f"{spec.mask}: the brain mask is empty")

    tr = run_tr(spec, info, options.tr)
    n_out, tr_out, in_time = n, tr, False  # in_time: resampled as the last step of pass 2
    if options.resample_tr is not None:
        if tr is None:
            raise InputError(f"{spec.bold}: no TR in its sidecar or header to resample from; give it with --tr")
        in_time, tr_out = differs(tr, options.resample_tr), options.resample_tr
        n_out = output_frames(n, tr, tr_out)
        if n_out < options.min_frames:
            raise InputError(f"{spec.bold}: {n_out} frames at TR {tr_out:g} s ({n} at {tr:g} s), fewer "
                             f"than one window ({options.min_frames})")
    # columns the run's confounds table lacks (the HCP pipelines write motion only) come from its frames,
    # as fMRIPrep computes them (neurox.data.tissue): in pass 1, or in a pass before it where the input's
    # denoising needs them
    signals = _frame_signals(spec, confounds, given_mask, info, tr, first)
    computed = []
    design = None  # the regressors removed from every voxel (frames, k), centred
    if options.denoising != "none":
        source = str(spec.confounds or spec.bold)
        if signals is not None and not _design_ok(confounds, options.denoising, source):
            planned = dict(confounds, **{c: np.zeros(n) for c in signals.planned(tr)})
            run_design(planned, options.denoising, source, spec)  # what the frames cannot give fails the run now
            for start, frames in kept_frames(info, options.block_frames, first):
                signals.add(start, frames)
            computed, signals = signals.into(confounds, tr), None
        design = run_design(confounds, options.denoising, source, spec)

    # pass 1: per-voxel sums on the target grid (and, to denoise, each voxel's
    # products with the regressors: the least-squares fit needs nothing else)
    total = np.zeros(grid_shape, dtype=np.float64)
    total_sq = np.zeros(grid_shape, dtype=np.float64)
    minimum = np.full(grid_shape, np.inf, dtype=np.float32)
    # voxels x regressors, voxels in the frames' own x-fastest order, so every product below is one matrix
    # product on a view of the block (no transposing copy)
    cross = np.zeros((int(np.prod(grid_shape)), design.shape[1])) if design is not None else None
    regressors = design.astype(np.float32) if design is not None else None
    for start, frames in kept_frames(info, options.block_frames, first):
        on_grid = mapping(frames)
        total += on_grid.sum(axis=3, dtype=np.float64)
        total_sq += np.einsum("xyzt,xyzt->xyz", on_grid, on_grid, dtype=np.float64)
        np.minimum(minimum, on_grid.min(axis=3), out=minimum)
        if signals is not None:
            signals.add(start, frames)
        if cross is not None:
            block = on_grid.reshape(-1, on_grid.shape[3], order="F")  # (voxels, frames), a view
            cross += block @ regressors[start : start + block.shape[1]]
    mean_image = total / n
    if signals is not None:
        computed, signals = signals.into(confounds, tr), None  # the CompCor series freed before pass 2
    coefficients = None
    if design is not None:
        # least squares per voxel, B = (X'X)^+ X'y; the fit's sum of squares, y'X B, leaves the residual's
        # (the centred regressors leave each voxel's mean as it was)
        inverse = np.linalg.pinv(design.T @ design)
        explained = np.zeros(len(cross))
        coefficients = np.empty(cross.shape[::-1], dtype=np.float32)  # regressors x voxels
        for lo in range(0, len(cross), 1 << 16):  # in slices of voxels: memory stays near the products'
            part = cross[lo : lo + (1 << 16)]
            solved = part @ inverse
            explained[lo : lo + len(part)] = np.einsum("vk,vk->v", part, solved)
            coefficients[:, lo : lo + len(part)] = solved.T
        total_sq -= explained.reshape(grid_shape, order="F")
        del cross

    if given_mask is not None:
        mask = mapping(given_mask.astype(np.uint8), nearest=True) > 0
        kept = mask.sum() * options.grid.voxel_size_mm**3 / (given_mask.sum() * np.prod(info.zooms[:3]))
    else:
        mask = compute_mask(mean_image)
        kept = 1.0
    check_mni_placement(spec, mask, options.grid, kept)

    if options.normalization == "global_zscore":
        count = mask.sum() * n
        mean = total[mask].sum() / count
        std = float(np.sqrt(max(total_sq[mask].sum() / count - mean**2, 0.0)))
        if std == 0.0:
            raise InputError(f"{spec.bold}: the signal inside the brain mask is constant")
        background = float((minimum[mask].min() - mean) / std)
        stats = {"method": "global_zscore", "mean": float(mean), "std": std, "background": background}
        scale = np.float32(1.0 / std)
        shift = np.float32(mean)
    elif options.normalization == "voxel_center":
        # each voxel's temporal mean removed (the static anatomy), one scale for the whole brain:
        # fluctuations keep their relative amplitude between regions
        variance = np.maximum(total_sq / n - mean_image**2, 0.0)
        temporal_std = float(np.sqrt(variance[mask].mean()))
        if temporal_std == 0.0:
            raise InputError(f"{spec.bold}: the signal inside the brain mask does not change over time")
        background = 0.0
        stats = {"method": "voxel_center", "temporal_std": temporal_std, "background": 0.0}
        scale = np.float32(1.0 / temporal_std)
        shift = mean_image.astype(np.float32)[..., None]
    else:
        voxel_std = np.sqrt(np.maximum(total_sq / n - mean_image**2, 0.0))
        voxel_std[voxel_std < 1e-6] = 1.0  # constant voxels (background) stay finite
        background = 0.0
        stats = {"method": "voxel_zscore", "background": 0.0,
                 "mean_of_means": float(mean_image[mask].mean()), "mean_of_stds": float(voxel_std[mask].mean())}
        scale = (1.0 / voxel_std).astype(np.float32)[..., None]
        shift = mean_image.astype(np.float32)[..., None]

    # pass 2: normalise (then resample in time) and write
    writer = writer_factory(n_out)
    resampler = TemporalResampler(n, tr, tr_out) if in_time else None
    try:
        outside = ~mask[..., None]
        for start, frames in kept_frames(info, options.block_frames, first, checked=True):
            on_grid = mapping(frames)
            if coefficients is not None:
                fit = regressors[start : start + on_grid.shape[3]] @ coefficients  # (frames, voxels)
                on_grid = on_grid - fit.T.reshape(on_grid.shape, order="F")  # a view in the block's own order
            z = (on_grid - shift) * scale
            if resampler is not None:
                z = resampler.push(z)  # the frames of the new TR whose input has all arrived
                if not z.shape[3]:
                    continue
            z[np.broadcast_to(outside, z.shape)] = background
            # the one transposing copy of the run: to C order (n, X, Y, Z), at half the bytes
            writer.write_frames(np.ascontiguousarray(np.moveaxis(z, 3, 0), dtype=np.float16))
    except BaseException:
        writer.abort()
        raise

    stat = spec.bold.stat()
    attributes = {
        "neurox_version": __version__,
        "participant_id": spec.participant_id,
        "session": spec.session,
        "run": spec.run,
        "run_id": spec.run_id,
        "n_frames": n_out,
        "tr": tr_out,
        "resampled_in_time": in_time,
        "non_steady_state_dropped": first,  # the source's leading frames left out (source frame ``first`` is 0)
        "affine": options.grid.affine.tolist(),
        "grid": list(grid_shape),
        "voxel_size_mm": options.grid.voxel_size_mm,
        "crop_box_mm": options.grid.crop_box_mm,
        "orientation": "RAS",
        "mask": pack_mask(mask),
        "mask_source": "given" if given_mask is not None else "computed",
        "normalization": stats,
        "denoising": {"confounds": options.denoising, "regressors": 0 if design is None else int(design.shape[1])},
        "source": {
            "path": str(spec.bold.resolve()),
            "sha256": file_sha256(spec.bold),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "shape": list(info.shape),
            "tr": tr,
            "affine": info.affine.tolist(),
            "mask": str(spec.mask.resolve()) if spec.mask else None,
            "resampled": not mapping.aligned,
            "confounds": str(spec.confounds.resolve()) if spec.confounds else None,
        },
        # what the run's confounds say of its motion (quality control); the table is stored beside
        "motion": motion_summary(confounds),
        "confounds": sorted(confounds),
        "computed_confounds": computed,  # columns neurox added to the run's table (from its frames)
    }
    stored = resample_table(confounds, tr, tr_out) if in_time else confounds  # one row per stored frame
    writer.commit(attributes, {CONFOUNDS_FILE: confounds_text(stored)} if confounds else None)
    return PreparedRun(n_out, attributes)


def _volume_on_run_grid(path: Path, info, bold: Path) -> np.ndarray:
    """A 3D image (mask, labels) given with a run, in RAS; refused unless on the run's own grid."""
    volume, volume_info = read_volume_ras(path)
    if volume.shape != info.ras_shape or not np.allclose(volume_info.ras_affine, info.ras_affine, atol=1e-3):
        raise InputError(f"{path}: shape {volume_info.shape[:3]} / affine do not match the run {bold.name} "
                         f"({info.shape[:3]})")
    return volume


def computable_confounds(spec: RunSpec, columns: set[str], n_frames: int, tr: float | None) -> list[str]:
    """Which of the columns a run's confounds table lacks its frames give (see neurox.data.tissue): the
    global signal where a brain mask is given, tissue signals and CompCor (``a_comp_cor``) where a label
    volume is, and the cosine basis for an HCP motion table (where the run is long enough to have one)."""
    if spec.confounds is None or spec.mask is None:
        return []
    kinds = ["global_signal"] if "global_signal" not in columns else []
    if spec.segmentation is not None and not {"white_matter", "csf"} <= columns:
        kinds += ["white_matter", "csf"] + ["a_comp_cor"] * ("a_comp_cor_00" not in columns)
    cosine = _is_hcp_motion(spec) and tr and cosine_basis(n_frames, tr).shape[1] and not any(
        c.startswith("cosine") for c in columns)
    return kinds + ["cosine"] * bool(cosine)


def _frame_signals(spec: RunSpec, confounds: dict, given_mask: np.ndarray | None, info,
                   tr: float, first: int) -> FrameSignals | None:
    """What the run's frames from ``first`` must give of the columns its confounds table lacks
    (``computable_confounds``)."""
    if not confounds or given_mask is None:
        return None
    kinds = computable_confounds(spec, set(confounds), info.n_frames - first, tr)
    if not kinds:
        return None
    means = {"global_signal": given_mask} if "global_signal" in kinds else {}
    compcor_mask = None
    if "white_matter" in kinds:
        tissues = tissue_masks(_volume_on_run_grid(spec.segmentation, info, spec.bold), given_mask)
        for name, mask in tissues.items():
            if not mask.any():
                raise InputError(f"{spec.segmentation}: no {name.replace('_', ' ')} voxels inside the brain mask")
        means.update(tissues)
        compcor_mask = tissues["white_matter"] | tissues["csf"] if "a_comp_cor" in kinds else None
    return FrameSignals(info.n_frames - first, means, compcor_mask, "cosine" in kinds)


NON_STEADY_SEARCH = 40  # frames searched for leading non-steady-state ones, as fMRIPrep's detector does
OUTLIER_Z = 3.5  # its robust z above which a frame is an outlier


def leading_frames_to_drop(spec: RunSpec, info: NiftiInfo) -> int:
    """The run's leading non-steady-state frames: those its fMRIPrep confounds table marks; for a run without
    one (an HCP run, a run of a manifest), those its frames show (``leading_bright_frames``)."""
    if has_markers(spec):
        return leading_non_steady(spec.confounds)
    return leading_bright_frames(read_first_frames(info, NON_STEADY_SEARCH))


def has_markers(spec: RunSpec) -> bool:
    """Whether the run's confounds table is fMRIPrep's, which marks its non-steady-state frames (HCP's is not)."""
    return spec.confounds is not None and spec.confounds.suffix == ".tsv"


def leading_bright_frames(frames: np.ndarray) -> int:
    """How many of the leading frames ``(X, Y, Z, n)`` are outliers of the image's mean signal: a robust z
    (0.6745 x the distance from the median over the median distance) above ``OUTLIER_Z``, from the first frame
    until one is not, over values clipped to the 99.8th percentile (a few extreme voxels move no mean); as
    fMRIPrep finds the frames it marks, on its raw runs. ``frames`` are clipped in place."""
    bad = ~np.isfinite(frames)
    if bad.any():
        frames[bad] = 0.0  # NaN outside the brain: background
    sample = frames.ravel(order="K")[:: max(1, frames.size // 2_000_000)]  # the percentiles, from a sample
    low = 0.0 if sample.min() >= 0 else float(np.percentile(sample, 0.2))
    np.clip(frames, low, float(np.percentile(sample, 99.8)), out=frames)
    signal = frames.mean(axis=(0, 1, 2), dtype=np.float64)
    distance = np.abs(signal - np.median(signal))
    spread = np.median(distance)
    outlier = distance > 0 if spread == 0 else 0.6745 * distance / spread > OUTLIER_Z
    return int(np.argmin(outlier)) if not outlier.all() else len(outlier)


def kept_frames(info: NiftiInfo, block_frames: int, first: int, checked: bool = False):
    """``iter_frame_blocks`` from source frame ``first`` on, numbered from it (views, not copies). The voxels not
    finite in the first of them are background, 0 in every frame (SPM, and some resampling tools, write NaN
    outside the brain); any other value that is not finite fails the run, naming its frame (unless ``checked``:
    an earlier pass over the file did)."""
    background = None
    for start, frames in iter_frame_blocks(info, block_frames):
        cut = max(first - start, 0)
        if cut >= frames.shape[3]:
            continue
        frames = frames[..., cut:]
        if background is None:
            background = ~np.isfinite(frames[..., 0])
        if background.any():
            frames[background] = 0.0
        if not checked and (bad := ~np.isfinite(frames)).any():
            raise InputError(f"{info.path}: NaN or Inf values (first in frame {start + cut + np.argwhere(bad)[0][3]})")
        yield start + cut - first, frames


def add_frame_signals(spec: RunSpec, table: dict, tr: float, block_frames: int = 32, first: int = 0) -> list[str]:
    """Add to a prepared run's confounds ``table`` (its frames from source frame ``first`` on) what its frames
    give and it lacks, in one read of the run (its store frames untouched); returns the names added."""
    info = read_info(spec.bold)
    if not computable_confounds(spec, set(table), info.n_frames - first, tr):  # nothing to add (or no brain mask)
        return []
    signals = _frame_signals(spec, table, _volume_on_run_grid(spec.mask, info, spec.bold) > 0, info, tr, first)
    for start, frames in kept_frames(info, block_frames, first):
        signals.add(start, frames)
    return signals.into(table, tr)


def _is_hcp_motion(spec: RunSpec) -> bool:
    return spec.confounds is not None and spec.confounds.name.startswith("Movement_Regressors")


def _design_ok(table: dict, denoising: str, source: str) -> bool:
    try:
        input_design(table or None, denoising, source)
        return True
    except InputError:
        return False


def run_design(table: dict, denoising: str, source: str, spec: RunSpec) -> np.ndarray:
    """``input_design``, whose refusal of a table that lacks a strategy's columns says, for an HCP run,
    where its tissue signals come from."""
    try:
        return input_design(table or None, denoising, source)
    except InputError as err:
        if _is_hcp_motion(spec) and spec.segmentation is None and "white_matter" in str(err):
            raise InputError(f"{err} (an HCP run gets them from <subject>/MNINonLinear/ROIs/wmparc.2.nii.gz, "
                             "in the structural package)") from None
        raise


def compute_mask(mean_image: np.ndarray) -> np.ndarray:
    """Brain mask from the temporal mean when none is given: voxels brighter than a fifth of the
    98th percentile of the non-zero mean (fMRIPrep/HCP MNI outputs have a near-zero background)."""
    positive = mean_image[mean_image > 0]
    if positive.size == 0:
        return np.zeros(mean_image.shape, dtype=bool)
    return mean_image > 0.2 * np.percentile(positive, 98)


def check_mni_placement(spec: RunSpec, mask: np.ndarray, grid: TargetGrid, kept_fraction: float) -> None:
    """A brain that misses the MNI box, or sits far from where MNI brains sit, is not in MNI space."""
    if not mask.any():
        raise InputError(f"{spec.bold}: no brain voxels inside the MNI crop box: is the run in MNI space?")
    centroid = (grid.affine @ np.append(np.argwhere(mask).mean(0), 1.0))[:3]
    distance = float(np.linalg.norm(centroid - MNI_BRAIN_CENTROID))
    if distance > MNI_CENTROID_TOLERANCE_MM:
        raise InputError(
            f"{spec.bold}: the brain is centred at {format_mm(centroid)} mm, {distance:.0f} mm from where MNI brains "
            "sit: not in MNI space?"
        )
    if kept_fraction < 0.9:
        raise InputError(f"{spec.bold}: only {kept_fraction:.0%} of the brain mask falls inside the crop box")


TR_RANGE_S = (0.02, 30.0)  # outside it (faster than fast MREG, slower than sparse sampling), not seconds


def run_tr(spec: RunSpec, info: NiftiInfo, given: float | None) -> float | None:
    """The run's TR in seconds: its sidecar's ``RepetitionTime``, else its header's (in the header's time unit),
    else ``given`` (``--tr``). A header TR that cannot be seconds (720 with the unit unset: milliseconds) counts
    as none; a sidecar's is an error, as BIDS says seconds."""
    low, high = TR_RANGE_S
    if spec.tr is not None:
        if not low <= spec.tr <= high:
            raise InputError(f"{sidecar_of(spec.bold)}: RepetitionTime {spec.tr:g} is not a TR in seconds "
                             f"({low:g}-{high:g} s); BIDS sidecars give seconds")
        return spec.tr
    header = None
    if len(info.zooms) > 3 and info.zooms[3] > 0 and info.seconds_per_time_unit is not None:
        header = info.zooms[3] * info.seconds_per_time_unit
    if header is not None and low <= header <= high:
        return float(header)
    if given is not None:
        return given
    if header is not None:
        raise InputError(f"{spec.bold}: the header's TR, {info.zooms[3]:g}, is not seconds (its time unit unset or "
                         "wrong?); give the TR in seconds with --tr")
    return None
