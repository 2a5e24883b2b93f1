"""Symmetric matrices of a cohort on disk, one per participant: what `neurox connectivity` and `neurox baseline`
hold instead of every matrix in memory (a Schaefer 400 matrix is 0.64 MB; 40,000 participants' are 26 GB)."""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np


class MatrixTable:
    """Symmetric (size, size) matrices on disk, one per participant, in the order appended: each one's upper
    triangle without the diagonal in ``<path>.edges.f32`` (participants x edges, float32), its diagonal in
    ``<path>.diagonal.f32``. Reading goes one matrix at a time, or one slice of edges for every participant."""

    def __init__(self, path: Path, size: int):
        self.path = path
        self.edges, self.diagonal = path.with_suffix(".edges.f32"), path.with_suffix(".diagonal.f32")
        self.size, self.upper, self.n = size, np.triu_indices(size, k=1), 0

    @contextmanager
    def appending(self):
        with open(self.edges, "wb") as edges, open(self.diagonal, "wb") as diagonal:
            def append(matrix: np.ndarray) -> None:
                edges.write(matrix[self.upper].astype(np.float32).tobytes())
                diagonal.write(np.diag(matrix).astype(np.float32).tobytes())
                self.n += 1
            yield append

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.matrices()

    def matrices(self, rows: Sequence[int] | None = None) -> Iterator[np.ndarray]:
        """Every matrix in order, or those of ``rows`` (positions in the order appended)."""
        n_edges = len(self.upper[0])
        with open(self.edges, "rb") as edges, open(self.diagonal, "rb") as diagonal:
            for row in range(self.n) if rows is None else rows:
                edges.seek(row * n_edges * 4)
                diagonal.seek(row * self.size * 4)
                yield self._read(edges, diagonal)

    def rows(self, rows: Sequence[int]) -> TableRows:
        """Some of the matrices, as something with a length that can be iterated again (not a copy)."""
        return TableRows(self, list(rows))

    def transform(self, function, rows: Sequence[int] | None = None) -> None:
        """Replaces each matrix (or those of ``rows``) by ``function(matrix)`` (symmetric, same size), in place:
        one matrix in memory and no second table on disk. Processes may transform distinct rows at once."""
        n_edges = len(self.upper[0])
        with open(self.edges, "r+b") as edges, open(self.diagonal, "r+b") as diagonal:
            for row in range(self.n) if rows is None else rows:
                edges.seek(row * n_edges * 4)
                diagonal.seek(row * self.size * 4)
                matrix = function(self._read(edges, diagonal))
                edges.seek(row * n_edges * 4)
                diagonal.seek(row * self.size * 4)
                edges.write(matrix[self.upper].astype(np.float32).tobytes())
                diagonal.write(np.diag(matrix).astype(np.float32).tobytes())

    def _read(self, edges, diagonal) -> np.ndarray:
        matrix = np.diag(np.fromfile(diagonal, dtype=np.float32, count=self.size).astype(np.float64))
        matrix[self.upper] = np.fromfile(edges, dtype=np.float32, count=len(self.upper[0]))
        matrix.T[self.upper] = matrix[self.upper]
        return matrix

    def edge_columns(self, lo: int, hi: int) -> np.ndarray:
        """Edges lo..hi of every participant, (n, hi - lo). The file is mapped for this read only, so the pages
        read do not stay in the process's memory from one slice to the next."""
        n_edges = len(self.upper[0])
        hi = min(hi, n_edges)
        if hi <= lo:
            return np.zeros((self.n, 0), dtype=np.float32)
        with open(self.edges, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            edges = np.frombuffer(mapped, dtype=np.float32, count=self.n * n_edges).reshape(self.n, n_edges)
            columns = edges[:, lo:hi].copy()
            del edges  # the map closes only once no array looks into it
        return columns


@dataclasses.dataclass
class TableRows:
    """Some rows of a MatrixTable, read from it each time they are iterated."""

    table: MatrixTable
    rows: list[int]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.table.matrices(self.rows)
