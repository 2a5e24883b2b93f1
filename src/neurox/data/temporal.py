"""Resampling a run in time onto another repetition time (``prepare --resample_tr``), streaming.

Cohorts are scanned at different TRs (HCP 0.72 s, UK Biobank 0.735 s, ABCD 0.8 s, many clinical cohorts 2-3
s), and a model's window of 20 frames spans 14 s of one and 60 s of another. Resampling every run onto one TR
gives every window one length in seconds.

Each output frame at ``k * tr_out`` is a weighted sum of the input frames at ``j * tr_in`` around it, with a
Lanczos kernel (a sinc windowed by a wider sinc, ``LOBES`` lobes each side) whose cutoff is the Nyquist
frequency of the coarser of the two TRs: upsampling interpolates band-limited, and downsampling first removes
what the new TR cannot hold (which would otherwise alias into the slow fluctuations resting-state work reads).
Each output frame's weights sum to one, so a constant stays that constant (a voxel's mean, the background)
at the edges of the run too, where the kernel is cut.

The weights are a small (output frames x input frames) matrix; the frames go through it a block at a time, so
memory is the kernel's span of frames, not the run.
"""

from __future__ import annotations

import numpy as np

from neurox.data.confounds import OUTLIER_PREFIX

LOBES = 3
# TRs this fraction apart are taken as one (HCP 0.72 s, UK Biobank 0.735 s, ABCD 0.8 s); further apart, a window
# of so many frames spans another length of time: stores are refused together, a model's store is warned of
TR_TOLERANCE = 0.1


def differs(tr_in: float, tr_out: float) -> bool:
    """Whether a run of ``tr_in`` needs resampling onto ``tr_out``: not where the two agree to 0.01% (a NIfTI
    header's float32 0.8 s reads 0.800000012)."""
    return abs(tr_out / tr_in - 1) > 1e-4


def output_frames(n_frames: int, tr_in: float, tr_out: float) -> int:
    """How many frames of ``tr_out`` fit in the time ``n_frames`` of ``tr_in`` span (first frame at 0 s); as
    many as there are where the TRs do not differ."""
    if not differs(tr_in, tr_out):
        return n_frames
    return int(np.floor((n_frames - 1) * tr_in / tr_out + 1e-9)) + 1


def _kernel(n_frames: int, tr_in: float, tr_out: float) -> tuple[np.ndarray, np.ndarray]:
    """(output frames, input frames): each output frame's Lanczos weights on the input frames, summing to 1, and
    where its kernel reaches (within ``LOBES`` of the coarser TR)."""
    if not (tr_in > 0 and tr_out > 0):
        raise ValueError(f"repetition times must be positive (from {tr_in} s to {tr_out} s)")
    t_out = np.arange(output_frames(n_frames, tr_in, tr_out)) * tr_out
    x = (t_out[:, None] - np.arange(n_frames)[None, :] * tr_in) / max(tr_in, tr_out)  # in coarser TRs
    inside = np.abs(x) < LOBES
    weights = np.where(inside, np.sinc(x) * np.sinc(x / LOBES), 0.0)
    return weights / weights.sum(axis=1, keepdims=True), inside


def resampling_weights(n_frames: int, tr_in: float, tr_out: float) -> np.ndarray:
    """(output frames, input frames): each output frame's Lanczos weights on the input frames, summing to 1."""
    return _kernel(n_frames, tr_in, tr_out)[0]


class TemporalResampler:
    """Frames in (``push`` blocks of ``(X, Y, Z, t)`` in time order), resampled frames out, each as soon as the
    input frames its kernel spans have arrived; frames no later output needs are let go."""

    def __init__(self, n_frames: int, tr_in: float, tr_out: float):
        weights, inside = _kernel(n_frames, tr_in, tr_out)
        self.weights = weights.astype(np.float32)
        # the span of input frames each output frame reads: both ends grow with the output frame
        self.first = inside.argmax(axis=1)
        self.last = n_frames - 1 - inside[:, ::-1].argmax(axis=1)
        self.n_in, self.n_out = n_frames, len(self.weights)
        self.held: np.ndarray | None = None  # input frames [held_from, received) as (frames, voxels)
        self.held_from = self.received = self.emitted = 0

    def push(self, block: np.ndarray) -> np.ndarray:
        """Take the next input frames ``(X, Y, Z, t)`` (kept, not copied, until the frames after them arrive: do
        not change them); give the output frames now complete ``(X, Y, Z, k)`` (k may be 0)."""
        spatial = block.shape[:3]
        # (frames, voxels) in C order: a view of a Fortran-ordered block, and what the product below reads
        frames = np.asfortranarray(block).reshape(-1, block.shape[3], order="F").T
        self.held = frames if self.held is None else np.concatenate([self.held, frames])
        self.received += block.shape[3]
        if self.received > self.n_in:
            raise ValueError(f"{self.received} frames pushed into a resampler of {self.n_in}")
        ready = int(np.searchsorted(self.last, self.received, side="left"))  # outputs whose last input is here
        start, stop = self.emitted, ready
        if stop <= start:
            return np.empty((*spatial, 0), dtype=block.dtype)
        lo, hi = int(self.first[start]), int(self.last[stop - 1]) + 1
        out = self.weights[start:stop, lo:hi] @ self.held[lo - self.held_from : hi - self.held_from]  # (k, voxels)
        self.emitted = stop
        # frames before the next output's span are no longer needed
        drop = (int(self.first[stop]) if stop < self.n_out else self.received) - self.held_from
        self.held, self.held_from = self.held[drop:], self.held_from + drop
        return out.T.reshape(*spatial, stop - start, order="F")  # a view

    @property
    def done(self) -> bool:
        return self.emitted == self.n_out


def resample_table(table: dict[str, np.ndarray], tr_in: float, tr_out: float) -> dict[str, np.ndarray]:
    """A run's confounds table resampled with its frames: each series through the same kernel (n/a as 0, as
    the denoising strategies fill it); a non-steady-state marker set on every output frame whose kernel spans
    the marked input frame, whose outsized values it draws on. Framewise displacement is interpolated, not
    recomputed: it stays the displacement between the source's frames."""
    if not table:
        return {}
    weights, spans = _kernel(len(next(iter(table.values()))), tr_in, tr_out)
    resampled = {}
    for name, values in table.items():
        if name.startswith(OUTLIER_PREFIX):
            resampled[name] = (spans & (values != 0)[None, :]).any(axis=1).astype(float)
        else:
            resampled[name] = weights @ np.nan_to_num(values.astype(float))
    return resampled
