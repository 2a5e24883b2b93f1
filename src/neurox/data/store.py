"""The chunked subject store that ``neurox prepare`` writes and training reads.

Layout::

    STORE/store.json            what every run in it shares: grid, voxel size, crop box, normalisation
    STORE/runs/<run_id>.zarr/   one Zarr v3 array (T, X, Y, Z) float16 per run: zarr.json holds the
                                attributes, one shard file (c/0/0/0/0) holds one compressed chunk per frame
    STORE/manifest.tsv          one row per run
    STORE/participants.tsv      the phenotype table, joined by participant_id (and session, where it has one)
    STORE/failures.tsv          the runs that could not be prepared, and why

One shard file per run keeps a cohort of 40,000 runs at about 40,000 data files. The shard is
written here frame by frame in the Zarr v3 ``sharding_indexed`` format (chunks, then an index of
(offset, length) per chunk with a crc32c), so memory stays at one block of frames whatever the run
length, and any Zarr v3 reader opens it. Reads go through ``read_window`` only; the ``npy`` backend
(an uncompressed memory-mapped array per run) sits behind the same interface.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from numcodecs import CRC32C, Blosc

from neurox.errors import UnreadableRun
from neurox.io.atomic import write_text_atomic

STORE_FILE = "store.json"
RUNS_DIR = "runs"
# a store's space where no input file named its MNI template (and that of every store written before neurox kept it)
UNNAMED_TEMPLATE = "MNI152"
# what a store written before the key existed holds
STORE_DEFAULTS = {"denoising": "none", "resample_tr": None, "non_steady_state": "keep", "bold_desc": "preproc"}
MANIFEST_COLUMNS = ["participant_id", "session", "run", "run_id", "path", "n_frames", "tr", "shape", "status",
                    "mean_fd", "max_fd", "non_steady_state_dropped", "source"]
# Blosc-LZ4 with byte shuffle: float16 frames to about 0.3 of their size (the background is one
# value; shuffling groups the exponent bytes) and decoded at ~6 GB/s, several times zstd's speed,
# which is what keeps window reads ahead of training.
BLOSC = {"cname": "lz4", "clevel": 5, "shuffle": "shuffle", "typesize": 2, "blocksize": 0}


def _blosc() -> Blosc:
    return Blosc(cname=BLOSC["cname"], clevel=BLOSC["clevel"], shuffle=Blosc.SHUFFLE, blocksize=BLOSC["blocksize"])

FORMATS = ("zarr", "npy")
TEMPORARY_PREFIX = ".tmp-"  # a run being written: runs/.tmp-<run_id>-<pid>, renamed into place when complete


# --- writing -----------------------------------------------------------------------------------


class RunWriter:
    """Writes one run into a temporary location; ``commit`` makes it appear atomically."""

    def __init__(self, store_root: Path, run_id: str, n_frames: int, grid, fmt: str = "zarr"):
        if fmt not in FORMATS:
            raise ValueError(f"unknown store format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.fmt, self.run_id, self.n_frames, self.grid = fmt, run_id, n_frames, tuple(int(g) for g in grid)
        self.runs = store_root / RUNS_DIR
        self.runs.mkdir(parents=True, exist_ok=True)
        self.final = run_path(store_root, run_id, fmt)
        self.tmp = self.runs / f"{TEMPORARY_PREFIX}{run_id}-{os.getpid()}"
        remove(self.tmp)
        self.frames_written = 0
        if fmt == "zarr":
            (self.tmp / "c" / "0" / "0" / "0").mkdir(parents=True)
            self._file = open(self.tmp / "c" / "0" / "0" / "0" / "0", "wb")
            self._index = np.zeros((n_frames, 2), dtype="<u8")
            self._codec = _blosc()
            self._encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="neurox-encode")
        else:
            self.tmp.mkdir(parents=True)
            self._array = np.lib.format.open_memmap(self.tmp / "data.npy", mode="w+", dtype=np.float16,
                                                    shape=(n_frames, *self.grid))

    def write_frames(self, frames: np.ndarray) -> None:
        """frames: (n, X, Y, Z) float16, the next n frames of the run."""
        n = frames.shape[0]
        if self.frames_written + n > self.n_frames or frames.shape[1:] != self.grid:
            raise ValueError(f"run {self.run_id}: frames {frames.shape} do not fit ({self.n_frames}, {self.grid})")
        if self.fmt == "zarr":
            # the codec releases the GIL: frames compress on two threads
            chunks = self._encoder.map(lambda f: self._codec.encode(np.ascontiguousarray(f, dtype="<f2")), frames)
            for i, chunk in enumerate(chunks):
                self._index[self.frames_written + i] = (self._file.tell(), len(chunk))
                self._file.write(chunk)
        else:
            self._array[self.frames_written : self.frames_written + n] = frames
        self.frames_written += n

    def commit(self, attributes: dict[str, Any], files: dict[str, str] | None = None) -> Path:
        """Make the run appear, with ``files`` (name -> text: the run's confounds) inside its folder."""
        if self.frames_written != self.n_frames:
            raise ValueError(f"run {self.run_id}: {self.frames_written} of {self.n_frames} frames written")
        if self.fmt == "zarr":
            self._encoder.shutdown()
            self._file.write(CRC32C().encode(self._index.reshape(self.n_frames, 1, 1, 1, 2).tobytes()))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            (self.tmp / "zarr.json").write_text(json.dumps(zarr_metadata(self.n_frames, self.grid, attributes)))
        else:
            self._array.flush()
            del self._array
            (self.tmp / "attributes.json").write_text(json.dumps(attributes))
        for name, text in (files or {}).items():
            (self.tmp / name).write_text(text)
        remove(self.final)  # a stale run being redone
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        if self.fmt == "zarr" and not self._file.closed:
            self._encoder.shutdown()
            self._file.close()
        remove(self.tmp)


def zarr_metadata(n_frames: int, grid, attributes: dict[str, Any]) -> dict[str, Any]:
    """Zarr v3 array metadata: one shard spanning the run, one chunk per frame."""
    shape = [n_frames, *grid]
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": shape,
        "data_type": "float16",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shape}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0.0,
        "codecs": [{
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": [1, *grid],
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                           {"name": "blosc", "configuration": dict(BLOSC)}],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                "index_location": "end",
            },
        }],
        "attributes": attributes,
        "dimension_names": ["t", "x", "y", "z"],
    }


def run_path(store_root: Path, run_id: str, fmt: str) -> Path:
    return store_root / RUNS_DIR / f"{run_id}.{fmt}"


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def pack_mask(mask: np.ndarray) -> dict[str, Any]:
    bits = np.packbits(mask.astype(bool).ravel())
    return {"shape": list(mask.shape), "packbits_zlib_base64": base64.b64encode(zlib.compress(bits.tobytes())).decode()}


def unpack_mask(packed: dict[str, Any]) -> np.ndarray:
    shape = tuple(packed["shape"])
    bits = np.frombuffer(zlib.decompress(base64.b64decode(packed["packbits_zlib_base64"])), dtype=np.uint8)
    return np.unpackbits(bits)[: int(np.prod(shape))].reshape(shape).astype(bool)


# --- reading -----------------------------------------------------------------------------------


REDO = "run neurox prepare into this store again to redo it"  # prepare's is_current reads the index: redoes such runs


class RunReader:
    """Random access to the frames of one run, without Zarr's machinery on the hot path."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".zarr":
            meta = json.loads((path / "zarr.json").read_text())
            self.attributes = meta["attributes"]
            self.n_frames, *grid = meta["shape"]
            self.grid = tuple(grid)
            self._shard = path / "c" / "0" / "0" / "0" / "0"
            index_bytes = 16 * self.n_frames + 4
            try:
                with open(self._shard, "rb") as f:
                    f.seek(-index_bytes, os.SEEK_END)
                    raw = f.read(index_bytes)
                self._index = np.frombuffer(CRC32C().decode(raw), dtype="<u8").reshape(self.n_frames, 2)
            except (OSError, ValueError, RuntimeError) as err:  # missing, truncated or damaged: its index with it
                raise UnreadableRun(f"{self._shard}: the run's frame index cannot be read ({err}); {REDO}") from err
            self._codec = _blosc()
        else:
            self.attributes = json.loads((path / "attributes.json").read_text())
            try:
                self._array = np.load(path / "data.npy", mmap_mode="r")
            except (OSError, ValueError) as err:  # missing or truncated
                raise UnreadableRun(f"{path / 'data.npy'}: the run cannot be read ({err}); {REDO}") from err
            self.n_frames, *grid = self._array.shape
            self.grid = tuple(grid)

    def confounds(self) -> dict[str, np.ndarray] | None:
        """The run's confounds as ``prepare`` kept them (column -> one value per frame), or None."""
        from neurox.data.confounds import CONFOUNDS_FILE, read_confounds

        path = self.path / CONFOUNDS_FILE
        return read_confounds(path) if path.is_file() else None

    def read(self, start: int, length: int) -> np.ndarray:
        """Frames [start, start + length) as float16 (length, X, Y, Z)."""
        if start < 0 or length < 1 or start + length > self.n_frames:
            raise IndexError(f"{self.path.name}: frames [{start}, {start + length}) outside 0..{self.n_frames}")
        if self.path.suffix != ".zarr":
            return np.array(self._array[start : start + length])
        first = int(self._index[start, 0])
        last = int(self._index[start + length - 1].sum())
        with open(self._shard, "rb") as f:  # one contiguous read for the whole window
            f.seek(first)
            blob = f.read(last - first)
        out = np.empty((length, *self.grid), dtype="<f2")
        view = memoryview(blob)
        for i in range(length):
            offset, size = (int(v) for v in self._index[start + i])
            try:
                self._codec.decode(view[offset - first : offset - first + size], out=out[i])
            except (OSError, ValueError, RuntimeError) as err:  # a damaged or truncated shard
                # the index is intact, so prepare would keep the run: it has to go first
                raise UnreadableRun(f"{self.path}: frame {start + i} cannot be read ({err}); remove {self.path}, "
                                    f"then {REDO}") from err
        return out


class Store:
    """A prepared store: its shared settings, its runs, and windows of frames."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / STORE_FILE).is_file():
            raise FileNotFoundError(f"{self.root}: not a neurox store (no {STORE_FILE}); make one with neurox prepare")
        self.info = {**STORE_DEFAULTS, **json.loads((self.root / STORE_FILE).read_text())}
        self._readers: dict[str, RunReader] = {}

    @property
    def manifest(self) -> list[dict[str, str]]:
        return read_tsv(self.root / "manifest.tsv")

    @property
    def run_ids(self) -> list[str]:
        return [row["run_id"] for row in self.manifest if row["status"] == "ok"]

    def run(self, run_id: str) -> RunReader:
        reader = self._readers.get(run_id)
        if reader is None:
            path = run_path(self.root, run_id, self.info["format"])
            if not path.exists():
                raise KeyError(f"{self.root}: no prepared run {run_id!r}")
            reader = self._readers[run_id] = RunReader(path)
        return reader

    def read_window(self, run_id: str, start: int, length: int) -> np.ndarray:
        """``(C, X, Y, Z, T)`` float16: ``length`` frames of a run from ``start`` (a view of
        ``read_frames``' memory: time-major, as stored)."""
        return np.moveaxis(self.read_frames(run_id, start, length), 1, -1)

    def read_frames(self, run_id: str, start: int, length: int) -> np.ndarray:
        """``(C, T, X, Y, Z)`` float16, contiguous: the cheapest layout to ship between processes."""
        return self.run(run_id).read(start, length)[None]

    def mask(self, run_id: str) -> np.ndarray:
        return unpack_mask(self.run(run_id).attributes["mask"])

    @cached_property
    def by_session(self) -> bool:
        """Whether the phenotype table has a row per session (a ``session`` column: age at each visit of a
        longitudinal cohort), so that each session of a participant is one unit of labels and metrics."""
        path = self.root / "participants.tsv"
        if not path.is_file():
            return False
        with open(path, newline="") as f:
            return "session" in f.readline().rstrip("\n").split("\t")

    def unit(self, row: dict[str, str]) -> str:
        """The unit a manifest row's run belongs to: its participant, or with a table by session, the
        participant's session (``sub-01_ses-2``)."""
        return unit_id(row["participant_id"], row.get("session", "")) if self.by_session else row["participant_id"]

    def units_of(self, ids: list[str], units: list[str]) -> tuple[list[str], list[str]]:
        """The ``units`` (see ``unit``) that ``ids`` name, and the ids that name none: an id is a unit itself, or
        with a table by session a participant, which names each of their sessions."""
        known, chosen, unknown = set(units), [], []
        for name in ids:
            found = [name] if name in known else [u for u in units if u.startswith(f"{name}_ses-")] \
                if self.by_session else []
            chosen += found
            unknown += [] if found else [name]
        return sorted(set(chosen)), unknown

    def phenotypes(self) -> list[dict[str, str]]:
        """The phenotype rows, keyed by ``participant_id``: the unit every label and metric is about. With a
        table by session, that is the participant's session (``sub-01_ses-2``) and ``person`` is the
        participant, whose sessions always share a split."""
        path = self.root / "participants.tsv"
        rows = read_tsv(path) if path.is_file() else []
        if rows and "session" in rows[0]:
            rows = [{**row, "person": row["participant_id"],
                     "participant_id": unit_id(row["participant_id"], row["session"])} for row in rows]
        return rows


def unit_id(participant: str, session: str) -> str:
    return f"{participant}_ses-{session}" if session else participant


# --- tables ------------------------------------------------------------------------------------


def read_tsv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def write_tsv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    lines = ["\t".join(columns)]
    for row in rows:
        lines.append("\t".join(_cell(row.get(c, "")) for c in columns))
    write_text_atomic(path, "\n".join(lines) + "\n")


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("\t", " ").replace("\n", " ")
