"""Streaming NIfTI reading: frames in blocks, canonical RAS orientation, never the whole run.

nibabel gives the header (shape, dtype, offset, scaling, affine); the voxel data are read here
frame block by frame block from the (possibly gzipped) file, so that a 1,200-frame run costs the
memory of one block. A 4D NIfTI stores each frame contiguously (Fortran order, time slowest).
"""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform


class InputError(ValueError):
    """A problem with one input file; the message names the file and says what is wrong."""


@dataclass(frozen=True)
class NiftiInfo:
    path: Path
    shape: tuple[int, ...]  # as stored
    affine: np.ndarray  # as stored
    dtype: np.dtype
    offset: int
    slope: float
    inter: float
    zooms: tuple[float, ...]
    seconds_per_time_unit: float | None = 1.0  # the header's time unit (ms: 0.001); None where it is not time

    @property
    def n_frames(self) -> int:
        return self.shape[3] if len(self.shape) == 4 else 1

    @property
    def to_ras(self) -> np.ndarray:
        """Orientation transform taking the stored axes to RAS."""
        return ornt_transform(io_orientation(self.affine), axcodes2ornt("RAS"))

    @property
    def ras_affine(self) -> np.ndarray:
        return self.affine @ inv_ornt_aff(self.to_ras, self.shape[:3])

    @property
    def ras_shape(self) -> tuple[int, int, int]:
        order = self.to_ras[:, 0].astype(int)
        shape = [0, 0, 0]
        for src, dst in enumerate(order):
            shape[dst] = self.shape[src]
        return tuple(shape)  # type: ignore[return-value]


def read_info(path: str | Path) -> NiftiInfo:
    path = Path(path)
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except Exception as err:  # nibabel raises several types for unreadable files
        raise InputError(f"{path}: not a readable NIfTI file ({_short(err)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI image ({type(img).__name__})")
    header = img.header
    proxy = img.dataobj  # the on-disk offset and scaling live here, not in the image's header copy
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    return NiftiInfo(
        path=path,
        shape=tuple(int(s) for s in img.shape),
        affine=img.affine.copy(),
        dtype=header.get_data_dtype(),
        offset=int(getattr(proxy, "offset", header.get_data_offset())),
        slope=1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope),
        inter=0.0 if inter is None or not np.isfinite(inter) else float(inter),
        zooms=tuple(float(z) for z in header.get_zooms()),
        seconds_per_time_unit=SECONDS_PER_UNIT.get(header.get_xyzt_units()[1]),
    )


# the NIfTI time units; nibabel's zooms are in the header's unit, which some converters set to milliseconds
SECONDS_PER_UNIT = {"sec": 1.0, "unknown": 1.0, "msec": 1e-3, "usec": 1e-6}


def iter_frame_blocks(info: NiftiInfo, block: int = 32) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_frame, frames)``: frames float32 ``(X, Y, Z, n)`` in RAS orientation.

    The arrays are Fortran-ordered views of the file's own layout (x fastest); nothing here pays for
    a transposing copy. A background thread decompresses the next block while the caller works on
    this one (zlib releases the GIL), with at most two blocks in flight.
    """
    if len(info.shape) == 3:
        raise InputError(f"{info.path}: a 3D image, not a 4D fMRI run")
    x, y, z, t = info.shape[:4]
    if len(info.shape) > 4 and int(np.prod(info.shape[4:])) != 1:
        raise InputError(f"{info.path}: a {len(info.shape)}D image, expected 4D (X, Y, Z, T)")
    frame_bytes = x * y * z * info.dtype.itemsize
    for start, raw in _prefetch(_raw_blocks(info, frame_bytes, block, t)):
        yield start, _as_frames(info, raw)


def read_first_frames(info: NiftiInfo, count: int) -> np.ndarray:
    """The run's first ``count`` frames (all of a shorter run), as ``iter_frame_blocks`` gives them; no more of
    the file is read."""
    if len(info.shape) < 4:
        raise InputError(f"{info.path}: a {len(info.shape)}D image, not a 4D fMRI run")
    frame_bytes = int(np.prod(info.shape[:3])) * info.dtype.itemsize
    blocks = _raw_blocks(info, frame_bytes, count, min(count, info.n_frames))
    try:
        _, raw = next(blocks)
    finally:
        blocks.close()
    return _as_frames(info, raw)


def _as_frames(info: NiftiInfo, raw: bytes) -> np.ndarray:
    """Frames float32 ``(X, Y, Z, n)`` in RAS orientation from the file's bytes: a Fortran-ordered view."""
    x, y, z = info.shape[:3]
    n = len(raw) // (x * y * z * info.dtype.itemsize)
    frames = np.frombuffer(raw, dtype=info.dtype).reshape((n, z, y, x)).transpose(3, 2, 1, 0)
    frames = frames.astype(np.float32, order="K")
    if info.slope != 1.0 or info.inter != 0.0:
        frames = frames * np.float32(info.slope) + np.float32(info.inter)
    return apply_orientation(frames, info.to_ras)


def _open(path: Path):
    """The file's bytes, decompressed: ISA-L's gzip (about twice zlib's speed) where installed."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
        try:
            from isal import igzip

            return igzip.open(path, "rb")
        except ImportError:
            pass
    return ImageOpener(str(path), "rb")


try:
    from isal.isal_zlib import error as _IsalError
except ImportError:  # pragma: no cover
    _IsalError = zlib.error
DECOMPRESSION_ERRORS = (EOFError, zlib.error, _IsalError, OSError)


def _raw_blocks(info: NiftiInfo, frame_bytes: int, block: int, t: int):
    try:
        with _open(info.path) as f:
            f.seek(info.offset)
            for start in range(0, t, block):
                n = min(block, t - start)
                raw = f.read(frame_bytes * n)
                if len(raw) != frame_bytes * n:
                    raise InputError(
                        f"{info.path}: file ends at frame {start + len(raw) // frame_bytes} of {t} "
                        "(truncated download or copy?)"
                    )
                yield start, raw
    except DECOMPRESSION_ERRORS as err:
        raise InputError(f"{info.path}: corrupt or truncated file ({_short(err)})") from None


def _prefetch(iterator, depth: int = 1):
    """Run ``iterator`` in a thread, ``depth`` items ahead; its exceptions surface here."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(done)
        except BaseException as err:  # handed to the consumer
            items.put(err)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def read_volume_ras(path: str | Path) -> tuple[np.ndarray, NiftiInfo]:
    """A 3D image (a mask or an atlas) in RAS orientation."""
    info = read_info(path)
    if len(info.shape) != 3 and not (len(info.shape) == 4 and info.shape[3] == 1):
        raise InputError(f"{path}: expected a 3D image, got shape {info.shape}")
    data = np.asanyarray(nib.load(str(path)).dataobj).reshape(info.shape[:3])
    return np.ascontiguousarray(apply_orientation(data, info.to_ras)), info


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
