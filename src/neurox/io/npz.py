"""An ``.npz`` written one array, or one row of an array, at a time, and atomically.

``np.savez`` needs every array in memory at once; a cohort's connectivity matrices (40,000 participants
of 400 x 400 float32 are 26 GB) do not fit. The file is the same format (a zip of ``.npy`` members), so
``np.load`` reads it as usual. Members are stored, not deflated: correlations and parcel series in float32
deflate to 92-93% of their size at 24 MB/s, which would add 18 minutes to a 26 GB write.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np

from neurox.io.atomic import atomic_path


class NpzWriter:
    def __init__(self, archive: zipfile.ZipFile):
        self._zip = archive

    def add(self, name: str, array: np.ndarray) -> None:
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)

    def add_rows(self, name: str, shape: tuple[int, ...], dtype, rows: Iterable[np.ndarray]) -> None:
        """An array of ``shape`` from its rows along the first axis, each of ``shape[1:]``, in order."""
        dtype = np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        written = 0
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, header)
            for row in rows:
                row = np.ascontiguousarray(row, dtype=dtype)
                if row.shape != tuple(shape[1:]):
                    raise ValueError(f"{name}: a row of shape {row.shape}, expected {tuple(shape[1:])}")
                member.write(row.tobytes())
                written += 1
        if written != shape[0]:
            raise ValueError(f"{name}: {written} rows written for a first axis of {shape[0]}")


@contextmanager
def npz_writer(path):
    """Yield an ``NpzWriter``; the file appears at ``path`` complete, or not at all."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED,
                                                   allowZip64=True) as archive:
        yield NpzWriter(archive)


def save_npy(path, array: np.ndarray) -> None:
    """One array as an ``.npy`` file, atomically (the kept parts of a long job that resumes from them)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
