"""Confound signals computed from a run's own frames, for runs whose confounds table lacks them.

fMRIPrep writes the tissue signals, anatomical CompCor and the cosine drift basis into every run's
confounds table; the HCP pipelines write head motion only. ``prepare`` fills the gap from the frames,
as fMRIPrep defines each column, so that the denoising strategies (``simple``, ``compcor``,
``global_signal``) mean the same thing on both:

- ``global_signal``: the mean over the run's brain mask of each frame;
- ``white_matter`` and ``csf``: the mean over the white-matter (eroded by one voxel, to keep grey-matter
  signal out) and the ventricle/CSF voxels of a FreeSurfer label volume on the run's grid (HCP's
  ``MNINonLinear/ROIs/wmparc.<resolution>.nii.gz``), with the label sets the HCP pipelines use for the same
  purpose (``global/config/FreeSurferWMRegLut.txt`` and ``FreeSurferCSFRegLut.txt``);
- ``a_comp_cor_00`` to ``_04``: the first five principal components of the voxel series inside both masks
  together, each voxel high-passed (the cosine basis) and scaled to unit variance first (Behzadi et al.
  2007, as fMRIPrep's combined aCompCor);
- ``cosine00`` ...: the discrete cosine basis of a 128 s high-pass filter (fMRIPrep's, nilearn's).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_erosion

HIGH_PASS_PERIOD_S = 128.0
N_COMPCOR = 5

# FreeSurfer labels of cerebral white matter: aseg's white matter, hypointensities, optic chiasm, corpus
# callosum, and every wmparc white-matter parcel (3000-4999, 5001-5002, 13100-14999)
_WM_SINGLE = (2, 41, 77, 78, 79, 85, 100, 109, *range(155, 163), 192, 219, 223, *range(251, 256), 703, 5001, 5002)
CSF_LABELS = (4, 5, 14, 15, 24, 31, 43, 44, 63, 72, 213, 221)  # ventricles, CSF, choroid plexus


def white_matter_labels(labels: np.ndarray) -> np.ndarray:
    """Where a FreeSurfer label volume is cerebral white matter."""
    return (np.isin(labels, _WM_SINGLE) | ((labels >= 3000) & (labels < 5000))
            | ((labels >= 13100) & (labels < 15000)))


def tissue_masks(labels: np.ndarray, brain: np.ndarray) -> dict[str, np.ndarray]:
    """The white-matter and CSF masks of a label volume, inside ``brain``."""
    labels = np.rint(labels).astype(np.int64)
    white = binary_erosion(white_matter_labels(labels), iterations=1)  # 6-neighbour: grey matter stays out
    return {"white_matter": white & brain, "csf": np.isin(labels, CSF_LABELS) & brain}


def cosine_basis(n_frames: int, tr: float, period_s: float = HIGH_PASS_PERIOD_S) -> np.ndarray:
    """(frames, k) discrete cosines of periods longer than ``period_s``, the constant left out, as
    fMRIPrep's ``cosine00``... columns and nilearn's cosine drift model compute them."""
    order = min(n_frames - 1, int(np.floor(2 * n_frames * tr / period_s)))
    t = np.arange(n_frames)[:, None] + 0.5
    k = np.arange(1, order + 1)[None, :]
    return np.sqrt(2.0 / n_frames) * np.cos(np.pi / n_frames * t * k)


def compcor(series: np.ndarray, basis: np.ndarray, n_components: int = N_COMPCOR) -> np.ndarray:
    """(frames, n) principal components of ``series`` (voxels, frames) after removing each voxel's mean and
    its fit by ``basis`` and scaling it to unit variance; each component has unit length."""
    q, _ = np.linalg.qr(np.column_stack([np.ones(series.shape[1]), basis]))
    gram = np.zeros((series.shape[1],) * 2)
    # the frames x frames Gram matrix, summed over slices of voxels: its eigenvectors are the left singular
    # vectors of the voxel series, and memory stays at one slice
    for lo in range(0, len(series), 4096):
        x = series[lo : lo + 4096].T.astype(np.float64)  # frames x voxels
        x -= q @ (q.T @ x)
        std = x.std(0)
        x = x[:, std > 1e-8] / std[std > 1e-8]
        gram += x @ x.T
    values, vectors = np.linalg.eigh(gram)
    top = vectors[:, np.argsort(values)[::-1][: min(n_components, len(series))]]
    return top * np.sign(top.sum(0) + 1e-30)  # a fixed sign, so that runs read alike


class FrameSignals:
    """Collects, block by block of a run's frames (X, Y, Z, t in RAS), the mean of each named mask and the
    voxel series that CompCor needs; ``columns(tr)`` gives them as confounds columns."""

    def __init__(self, n_frames: int, means: dict[str, np.ndarray], compcor_mask: np.ndarray | None,
                 cosine: bool):
        self.means = means
        self.values = {name: np.zeros(n_frames) for name in means}
        self.compcor_mask = compcor_mask
        self.series = np.zeros((int(compcor_mask.sum()), n_frames), np.float32) if compcor_mask is not None else None
        self.cosine = cosine
        self.n_frames = n_frames

    def planned(self, tr: float) -> list[str]:
        """The columns ``columns(tr)`` will give."""
        n_compcor = min(N_COMPCOR, len(self.series)) if self.series is not None else 0
        n_cosine = cosine_basis(self.n_frames, tr).shape[1] if self.cosine else 0
        return (list(self.means) + [f"a_comp_cor_0{i}" for i in range(n_compcor)]
                + [f"cosine{i:02d}" for i in range(n_cosine)])

    def add(self, start: int, frames: np.ndarray) -> None:
        end = start + frames.shape[3]
        for name, mask in self.means.items():
            self.values[name][start:end] = frames[mask].mean(0, dtype=np.float64)
        if self.series is not None:
            self.series[:, start:end] = frames[self.compcor_mask]

    def into(self, table: dict[str, np.ndarray], tr: float) -> list[str]:
        """Add the columns to a confounds ``table``; returns their names."""
        table.update(self.columns(tr))
        return self.planned(tr)

    def columns(self, tr: float | None) -> dict[str, np.ndarray]:
        table = dict(self.values)
        # the high-pass CompCor removes first; a run of unknown TR has its mean removed only
        basis = cosine_basis(self.n_frames, tr) if tr else np.zeros((self.n_frames, 0))
        if self.series is not None:
            for i, component in enumerate(compcor(self.series, basis).T):
                table[f"a_comp_cor_0{i}"] = component
        if self.cosine:
            table.update({f"cosine{i:02d}": basis[:, i] for i in range(basis.shape[1])})
        return table
