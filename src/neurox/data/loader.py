"""From a store to training and evaluation windows: participant splits, targets, datasets.

Honest evaluation starts here: splits are by participant (all runs and sessions of one person on
one side), seeded, stratified by a class target, and saved; regression targets are standardised
with the training participants' statistics only; rows without a target are left out and counted.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from neurox.data.store import Store, read_tsv, write_tsv

SPLITS = ("train", "val", "test")
TASK_CHOICES = ("binary", "multiclass", "regression")


@dataclass
class Target:
    """One phenotype column and how it is encoded."""

    column: str
    task: str
    classes: list[str] = field(default_factory=list)  # classification: value -> index
    mean: float = 0.0  # regression: standardised with training participants' statistics
    std: float = 1.0
    gap_fit: list[float] | None = None  # regression: (intercept, slope) of the gap on the true value, validation
    # what the saved head's outputs were lowered by, so that the class decision favours no class
    # (neurox.train.objectives.decision_thresholds): binary, the trained model's logit halfway between the classes'
    # validation participants; several classes, one offset per class
    threshold: float | list[float] | None = None

    @property
    def num_outputs(self) -> int:
        return len(self.classes) if self.task == "multiclass" else 1

    def encode(self, value: str) -> float:
        if self.task == "regression":
            return (float(value) - self.mean) / self.std
        return float(self.classes.index(value))

    def decode(self, output: np.ndarray) -> np.ndarray:
        """Model outputs (subjects, k) -> predictions in the column's units or class labels."""
        if self.task == "regression":
            return output[:, 0] * self.std + self.mean
        if self.task == "binary":
            return np.array(self.classes)[(output[:, 0] > 0).astype(int)]
        return np.array(self.classes)[output.argmax(1)]

    def to_dict(self) -> dict:
        return {"column": self.column, "task": self.task, "classes": self.classes, "mean": self.mean, "std": self.std,
                "gap_fit": self.gap_fit, **({"threshold": self.threshold} if self.task != "regression" else {})}


FEW_NUMBERS = 12  # a number target of no more distinct whole values than this may hold classes, or codes for no answer


def describe_target(target: Target, values: list[str]) -> str:
    """What a target was read as, from its values: a column of codes read as numbers (UK Biobank's -3 "prefer not
    to answer", ABCD's 777 and 999) shows here, before any training."""
    if target.task == "regression":
        numbers = np.array([float(v) for v in values])
        text = f"a number, {numbers.min():g} to {numbers.max():g} (mean {numbers.mean():.4g}, {len(numbers)} values)"
        distinct = np.unique(numbers)
        if len(distinct) <= FEW_NUMBERS and np.array_equal(distinct, np.round(distinct)):
            text += (f"; only {len(distinct)} distinct values ({', '.join(f'{d:g}' for d in distinct)}): if they are "
                     "classes, --task multiclass; if some are codes for no answer, make them n/a in the phenotype "
                     "table")
        elif codes := no_answer_codes(numbers):
            counts = ", ".join(f"{c:g} ({int(np.sum(numbers == c))})" for c in codes)
            text += (f"; {counts} look like codes for no answer (UK Biobank's negatives, ABCD's 777 and 999): if so, "
                     "make them n/a in the phenotype table")
        return text
    counts = [(c, values.count(c)) for c in target.classes]
    if target.task == "binary":
        (first, n_first), (second, n_second) = counts
        return (f"two classes, {first} ({n_first}) and {second} ({n_second}); {second} is the positive class (the "
                "output and AUROC are of it)")
    return f"{len(counts)} classes, " + ", ".join(f"{c} ({n})" for c, n in counts)


def no_answer_codes(numbers: np.ndarray) -> list[float]:
    """The values of a number column that look like codes for no answer rather than measurements: whole negative
    values where at least 90% of the values are not negative (UK Biobank's -1 "do not know", -3 "prefer not to
    answer"), and whole numbers of one repeated digit (77, 999, -9999: ABCD's 777 "refused", 999 "do not know")
    beyond twice every other value's size."""
    whole = np.unique(numbers[numbers == np.round(numbers)])
    rare_negatives = np.mean(numbers >= 0) >= 0.9
    repeated = [v for v in whole if abs(v) >= 77 and len(set(str(int(abs(v))))) == 1]
    rest = np.abs(numbers[~np.isin(numbers, repeated)])
    largest = rest.max() if len(rest) else 0.0
    return [float(v) for v in whole if (v < 0 and rare_negatives) or (v in repeated and abs(v) > 2 * largest)]


def missing_value(value: str | None) -> bool:
    return value is None or value.strip() in ("", "n/a", "NA", "nan", "NaN")


def numeric_values(values: list[str]) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return True


def infer_target(column: str, values: list[str], task: str | None = None) -> Target:
    """Binary for two distinct values, multiclass for a few non-numeric ones, regression for numbers."""
    distinct = sorted(set(values), key=lambda v: (float(v) if numeric_values([v]) else math.inf, v))
    if task is None:
        if len(distinct) == 2:
            task = "binary"
        elif numeric_values(distinct):
            task = "regression"
        else:
            task = "multiclass"
    if task == "binary" and len(distinct) != 2:
        raise ValueError(f"target {column!r} has {len(distinct)} distinct values; a binary target needs exactly 2")
    if task == "multiclass" and not 3 <= len(distinct) <= 100:
        raise ValueError(f"target {column!r} has {len(distinct)} classes; multiclass needs 3 to 100")
    if task == "regression" and not numeric_values(distinct):
        raise ValueError(f"target {column!r} is not numeric; it cannot be a regression target")
    return Target(column, task, classes=distinct if task != "regression" else [])


@dataclass
class Cohort:
    """The participants of a store with a value for every target, their runs, and their split."""

    targets: list[Target]
    participants: list[str]  # sorted ids with all targets present
    values: dict[str, list[str]]  # participant -> raw target values
    runs: dict[str, list[str]]  # participant -> run ids
    n_frames: dict[str, int]  # run id -> frames
    split: dict[str, str] = field(default_factory=dict)
    left_out: int = 0  # participants without some target value
    person: dict[str, str] = field(default_factory=dict)  # unit -> participant, where units are sessions
    split_by: str | None = None  # a phenotype column whose value participants sharing it keep on one split side
    group: dict[str, str] = field(default_factory=dict)  # unit -> its value of split_by, where it has one

    def labels(self, participant: str) -> np.ndarray:
        return np.array([t.encode(v) for t, v in zip(self.targets, self.values[participant])], dtype=np.float32)

    def say_left_out(self, command: str, unusable: str = "empty or n/a") -> None:
        """One line on stderr on the participants left out for lack of a target value, when there are any."""
        if self.left_out:
            columns = ", ".join(t.column for t in self.targets)
            print(f"neurox {command}: {self.left_out} of {self.left_out + len(self.participants)} participants with "
                  f"prepared runs have no usable value of {columns} ({unusable}): left out", file=sys.stderr)

    def say_targets(self, command: str) -> None:
        """One line per target on stderr: what it was read as (``describe_target``)."""
        for i, target in enumerate(self.targets):
            said = describe_target(target, [self.values[p][i] for p in self.participants])
            print(f"neurox {command}: {target.column}: {said}", file=sys.stderr)

    def in_split(self, name: str) -> list[str]:
        return [p for p in self.participants if self.split.get(p) == name]


def prepared_runs(store: Store, participants=None, by_person: bool = False) -> tuple[dict[str, list[str]],
                                                                                    dict[str, int]]:
    """Participant (or, with a phenotype table by session, participant session, unless ``by_person``) -> run
    ids, and run id -> frames, of the store's successfully prepared runs (of ``participants`` only, when given)."""
    runs: dict[str, list[str]] = {}
    n_frames = {}
    for row in store.manifest:
        unit = row["participant_id"] if by_person else store.unit(row)
        if row["status"] == "ok" and (participants is None or unit in participants):
            runs.setdefault(unit, []).append(row["run_id"])
            n_frames[row["run_id"]] = int(row["n_frames"])
    return runs, n_frames


def matching(store: Store, where: str) -> set[str]:
    """The participants whose phenotype row has ``where`` (``COLUMN=VALUE``: a diagnosis, a visit, a site)."""
    table = store.phenotypes()
    column, _, value = where.partition("=")
    if not value or not table or column not in table[0]:
        raise ValueError(f"--where {where!r}: expected COLUMN=VALUE with a column of {store.root / 'participants.tsv'}")
    return {row["participant_id"] for row in table if row.get(column, "").strip() == value.strip()}


def load_cohort(store: Store, columns: list[str], tasks: list[str | None] | None = None,
                split_by: str | None = None, where: str | None = None) -> Cohort:
    """The store's participants with a value of every target ``columns``; ``split_by``, a column (a family ID,
    a site) whose value keeps the participants who share it on one side of the split; ``where``, only the
    participants with this phenotype value (``COLUMN=VALUE``: controls for a normative model)."""
    table = store.phenotypes()
    if not table:
        raise ValueError(f"{store.root}: the store has no phenotype table (participants.tsv); "
                         "give one to neurox prepare --participants")
    if where:
        chosen = matching(store, where)
        table = [row for row in table if row["participant_id"] in chosen]
        if not table:
            raise ValueError(f"--where {where}: no participant of {store.root / 'participants.tsv'} has it")
    for column in [*columns, *([split_by] if split_by else [])]:
        if column not in table[0]:
            known = ", ".join(c for c in table[0] if c != "participant_id")
            what = "--split_by" if column == split_by and column not in columns else "target"
            raise ValueError(f"{store.root}: no {what} column {column!r} in participants.tsv (columns: {known})")
    runs, n_frames = prepared_runs(store)
    values, person, group, left_out = {}, {}, {}, 0
    for row in table:
        pid = row["participant_id"]
        if pid not in runs:
            continue
        if any(missing_value(row.get(c)) for c in columns):
            left_out += 1
            continue
        values[pid] = [row[c].strip() for c in columns]
        person[pid] = row.get("person", pid)
        if split_by and not missing_value(row.get(split_by)):
            group[pid] = row[split_by].strip()
    if len(values) < 3:
        raise ValueError(f"{store.root}: only {len(values)} participants have prepared runs and all of "
                         f"{', '.join(columns)}; need at least 3")
    tasks = tasks or [None] * len(columns)
    targets = [infer_target(c, [v[i] for v in values.values()], tasks[i]) for i, c in enumerate(columns)]
    if len(targets) > 1 and any(t.task == "multiclass" for t in targets):
        raise ValueError("a multiclass target must be the only target")
    return Cohort(targets, sorted(values), values, {p: runs[p] for p in values}, n_frames, left_out=left_out,
                  person=person, split_by=split_by, group=group)


def _blocks(cohort: Cohort, say: bool) -> tuple[dict[str, list[str]], dict[str, list[str]], list[list[str]]]:
    """The units a split or fold keeps together: person -> their units (a participant's sessions, where the units
    are sessions), block -> its people (without ``cohort.split_by`` each person is a block; with it, everyone who
    shares a value), and the blocks by stratum (the first target's class of a block's first unit; one stratum
    for a regression target). ``say``: how many participants have no ``split_by`` value, in one line."""
    first = cohort.targets[0]
    sessions: dict[str, list[str]] = {}
    for p in cohort.participants:
        sessions.setdefault(cohort.person.get(p, p), []).append(p)
    blocks: dict[str, list[str]] = {}
    alone = 0
    for person, units in sessions.items():
        value = next((cohort.group[u] for u in units if u in cohort.group), None)
        alone += bool(cohort.split_by) and value is None
        blocks.setdefault(person if value is None else f"{cohort.split_by}={value}", []).append(person)
    if alone and say:
        print(f"neurox: {alone} of {len(sessions)} participants have no {cohort.split_by} value: each is split on "
              "its own", file=sys.stderr)
    strata: dict[str, list[str]] = {}
    for block, people in blocks.items():
        strata.setdefault("all" if first.task == "regression" else cohort.values[sessions[people[0]][0]][0],
                          []).append(block)
    return sessions, blocks, list(strata.values())


def split_participants(cohort: Cohort, seed: int, fractions=(0.6, 0.2, 0.2), say: bool = True) -> dict[str, str]:
    """Participant -> train/val/test, seeded; stratified by the first target when it is a class. Units that must
    not be trained on and tested apart go to one side together (``_blocks``): a participant's sessions and, with
    ``cohort.split_by``, everyone who shares its value (the members of a family, the participants of a site).
    The fractions count people; such a block is stratified by its first unit's class. ``say``: the split made by
    ``split_by`` in one line (one process of several says it)."""
    rng = np.random.default_rng(seed)
    sessions, blocks, strata = _blocks(cohort, say)
    split = {}
    for members in strata:
        members = list(rng.permutation(members))
        n = sum(len(blocks[b]) for b in members)
        n_val = max(1, int(round(fractions[1] * n))) if n >= 3 else 0
        n_test = max(1, int(round(fractions[2] * n))) if n >= 3 else 0
        # the largest groups first (the order is seeded among groups of one size), each to validation, test or
        # training, the first with room for all of it; a group too large for any goes where a side is still empty,
        # else where most room is left. Participants alone (no split_by) fill validation, test, then training.
        members.sort(key=lambda b: -len(blocks[b]))
        target = {"val": n_val, "test": n_test, "train": n - n_val - n_test}
        room = dict(target)
        for block in members:
            size = len(blocks[block])
            side = next((name for name in room if size <= room[name]), None)
            if side is None:
                empty = [name for name in ("val", "test") if 0 < target[name] == room[name]]
                side = empty[0] if empty else max(room, key=lambda name: room[name])
            room[side] -= size
            for person in blocks[block]:
                for p in sessions[person]:
                    split[p] = side
    if cohort.split_by:
        _check_split_by(cohort.split_by, split, fractions, blocks, sessions, say)
    return split


def fold_participants(cohort: Cohort, seed: int, folds: int, say: bool = True) -> dict[str, int]:
    """Participant -> fold (1 to ``folds``), seeded, for k-fold cross-validation: every participant is tested
    once, by a model fitted on the other folds. The same blocks as ``split_participants`` stay in one fold (a
    participant's sessions; with ``cohort.split_by`` a family or a site), and each stratum's blocks are dealt, the
    largest first and otherwise in a seeded order, to the fold with the fewest of that stratum's people (then the
    fewest people), so the folds are balanced by class and by size."""
    if folds < 2:
        raise ValueError(f"--folds {folds}: cross-validation needs 2 folds or more")
    rng = np.random.default_rng(seed)
    sessions, blocks, strata = _blocks(cohort, say)
    if len(blocks) < folds:
        units = f"{cohort.split_by} groups" if cohort.split_by else "participants"
        raise ValueError(f"--folds {folds}: only {len(blocks)} {units} to deal into them; choose fewer folds")
    total = [0] * folds
    fold_of_block = {}
    for members in strata:
        members = sorted(rng.permutation(members), key=lambda b: -len(blocks[b]))  # stable: seeded among equals
        in_stratum = [0] * folds
        for block in members:
            fold = min(range(folds), key=lambda f: (in_stratum[f], total[f], f))
            fold_of_block[block] = fold + 1
            in_stratum[fold] += len(blocks[block])
            total[fold] += len(blocks[block])
    if cohort.split_by and say:
        groups = [sum(f == k for f in fold_of_block.values()) for k in range(1, folds + 1)]
        print(f"folds by {cohort.split_by}: " + ", ".join(f"{n} participants ({g} group{'' if g == 1 else 's'})"
                                                         for n, g in zip(total, groups)), file=sys.stderr)
    return {p: fold_of_block[block] for block, people in blocks.items() for person in people for p in sessions[person]}


def _check_split_by(column: str, split: dict[str, str], fractions, blocks: dict[str, list[str]],
                    sessions: dict[str, list[str]], say: bool) -> None:
    """An error where a side the fractions ask for is empty (groups too few or too large to fill it); else, with
    ``say``, one line with each side's participants and groups (a participant without a value is a group)."""
    side_of = {block: split[sessions[people[0]][0]] for block, people in blocks.items()}
    people = {side: sum(len(blocks[b]) for b in blocks if side_of[b] == side) for side in SPLITS}
    count = {side: sum(side_of[b] == side for b in blocks) for side in SPLITS}
    empty = [name for name, fraction in zip(SPLITS, fractions) if fraction > 0 and not people[name]]
    if empty:
        raise ValueError(f"--split_by {column}: its {len(blocks)} values cannot fill the {' and '.join(empty)} "
                         f"split (largest holds {max(len(v) for v in blocks.values())} participants); choose a column "
                         "with more, smaller groups")
    names = {"train": "training", "val": "validation", "test": "test"}
    if say:
        print(f"split by {column}: " + ", ".join(f"{people[s]} {names[s]} participants ({count[s]} group"
                                                 f"{'' if count[s] == 1 else 's'})" for s in SPLITS), file=sys.stderr)


def save_splits(path: Path, split: dict[str, str]) -> None:
    write_tsv(path, [{"participant_id": p, "split": s} for p, s in sorted(split.items())], ["participant_id", "split"])


def load_splits(path: Path) -> dict[str, str]:
    return {row["participant_id"]: row["split"] for row in read_tsv(path)}


def save_folds(path: Path, folds: dict[str, int]) -> None:
    write_tsv(path, [{"participant_id": p, "fold": f} for p, f in sorted(folds.items())], ["participant_id", "fold"])


def standardise(cohort: Cohort) -> None:
    """Regression targets: mean and std of the training participants only."""
    train = cohort.in_split("train")
    for i, target in enumerate(cohort.targets):
        if target.task == "regression":
            values = np.array([float(cohort.values[p][i]) for p in train])
            target.mean = float(values.mean())
            target.std = float(values.std()) or 1.0


# --- datasets ------------------------------------------------------------------------------------


def fit_to_grid(window: np.ndarray, grid) -> np.ndarray:
    """Centre-crop, or pad with the background value, (C, T, X, Y, Z) to the model's spatial grid."""
    out = window
    for axis, size in enumerate(grid, start=2):
        have = out.shape[axis]
        if have > size:
            start = (have - size) // 2
            out = np.take(out, range(start, start + size), axis=axis)
        elif have < size:
            pad = [(0, 0)] * out.ndim
            pad[axis] = ((size - have) // 2, size - have - (size - have) // 2)
            out = np.pad(out, pad, constant_values=float(out.min()))
    return out


class WindowDataset(Dataset):
    """Items are (run_id, start); returns (window, labels, item index) with the window float16
    ``(C, T, X, Y, Z)`` as stored (half the bytes of float32 between processes, no transposing
    copy); ``as_model_input`` makes the model's float ``(B, C, X, Y, Z, T)`` of a batch on the device."""

    def __init__(self, store_root: str | Path, cohort: Cohort, items: list[tuple[str, int]], length: int, grid):
        self.store_root = Path(store_root)
        self.items = items
        self.length = length
        self.grid = tuple(grid)
        self.run_participant = {r: p for p, runs in cohort.runs.items() for r in runs}
        self.labels = {p: cohort.labels(p) for p in cohort.participants}
        self._store = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        if self._store is None:  # opened lazily, once per loader worker
            self._store = Store(self.store_root)
        run_id, start = self.items[index]
        window = fit_to_grid(self._store.read_frames(run_id, start, self.length), self.grid)
        return torch.from_numpy(np.ascontiguousarray(window)), torch.from_numpy(
            self.labels[self.run_participant[run_id]]), index

    def participant(self, index: int) -> str:
        return self.run_participant[self.items[index][0]]


class ThreadedLoader:
    """Batches of a map-style dataset, read ahead by worker threads.

    Threads, not processes: reading a window is file reads and Blosc decompression, which release
    the GIL, so threads scale with cores while a process pool would copy every window (35 MB at the
    paper's grid) through shared memory, which measured slower than the reads themselves.
    """

    def __init__(self, dataset, indices, batch_size: int, workers: int = 2, prefetch: int = 2,
                 drop_last: bool = False):
        self.dataset, self.indices, self.batch_size = dataset, list(indices), batch_size
        self.workers, self.prefetch, self.drop_last = workers, prefetch, drop_last

    def __len__(self) -> int:
        full, rest = divmod(len(self.indices), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _batches(self):
        for start in range(0, len(self.indices), self.batch_size):
            batch = self.indices[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def _load(self, batch):
        return torch.utils.data.default_collate([self.dataset[i] for i in batch])

    def __iter__(self):
        if self.workers <= 0:
            yield from (self._load(b) for b in self._batches())
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        pending: deque = deque()
        batches = self._batches()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="neurox-loader") as pool:
            try:
                for batch in batches:
                    pending.append(pool.submit(self._load, batch))
                    if len(pending) > self.workers * self.prefetch:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()


def as_model_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, C, T, X, Y, Z) float16 -> (B, C, X, Y, Z, T) float32 on ``device`` (a permuted view)."""
    return batch.to(device, non_blocking=True).float().permute(0, 1, 3, 4, 5, 2)


def run_windows(store: Store, run_ids: list[str], length: int) -> list[tuple[str, int]]:
    """Every non-overlapping window (run id, start) of these runs."""
    return [(r, s) for r in run_ids for s in range(0, store.run(r).n_frames - length + 1, length)]


def window_batches(store: Store, windows: list[tuple[str, int]], length: int, grid, batch_size: int,
                   device: torch.device):
    """(windows of the batch, model input (B, C, X, Y, Z, T) float on ``device``), batch by batch."""
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        x = np.stack([fit_to_grid(store.read_frames(r, s, length), grid) for r, s in chunk])
        yield chunk, as_model_input(torch.from_numpy(x), device)


def training_items(cohort: Cohort, length: int, seed: int, epoch: int) -> list[tuple[str, int]]:
    """Random windows (any start) of the training runs: as many per run as fit without overlap,
    in an order fixed by (seed, epoch) so that a resumed run sees the same data."""
    items = []
    for p in cohort.in_split("train"):
        for run_id in cohort.runs[p]:
            n = cohort.n_frames[run_id]
            if n < length:
                continue
            rng = np.random.default_rng([seed, epoch, _stable_hash(run_id)])
            items += [(run_id, int(s)) for s in rng.integers(0, n - length + 1, size=n // length)]
    order = np.random.default_rng([seed, epoch]).permutation(len(items))
    return [items[i] for i in order]


def evaluation_items(cohort: Cohort, participants: list[str], length: int) -> list[tuple[str, int]]:
    """Every non-overlapping window of every run of the given participants."""
    return [(run_id, start) for p in participants for run_id in cohort.runs[p]
            for start in range(0, cohort.n_frames[run_id] - length + 1, length)]


def _stable_hash(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())
