"""The phenotype table a store carries (``participants.tsv``), made from what cohorts ship: a BIDS
``participants.tsv``, HCP's ``unrestricted_*.csv`` (ids in ``Subject``), a UK Biobank extract (``eid``)...

Rows are matched to the runs by participant label, the way BIDS names participants: ``100307``,
``sub-100307`` and ``sub_100307`` are one participant (a ``sub-`` or ``sub_`` prefix and any character that is not a
letter or digit are ignored). The store's table names each participant exactly as its runs do, so every
command after ``prepare`` joins on ``participant_id`` alone.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from neurox.data.store import write_tsv
from neurox.io.nifti import InputError

ID_COLUMN = "participant_id"


def participant_label(value: str) -> str:
    """What identifies a participant in ``value``: its label without ``sub-`` (or ``sub_``), letters and digits
    only, as BIDS labels are."""
    return re.sub(r"[^A-Za-z0-9]", "", re.sub(r"^sub[-_]", "", value.strip()))


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of a .csv (commas) or any other text table (tabs)."""
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheet exports start with a BOM
            reader = csv.DictReader(f, delimiter=delimiter)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path}: cannot read the phenotype table ({err})") from None


@dataclass
class PhenotypeTable:
    columns: list[str]
    rows: list[dict[str, str]]
    summary: str  # how many participants with runs have a row

    def write(self, path: Path) -> None:
        write_tsv(path, self.rows, self.columns)


def phenotype_table(source: Path, run_participants: list[str], id_column: str | None = None) -> PhenotypeTable:
    """The table ``source`` as a store keeps it: its ids (in ``id_column``, default ``participant_id``)
    renamed to the runs' names, in ``participant_id``, first."""
    if not source.is_file():
        raise InputError(f"{source}: phenotype table not found")
    columns, rows = read_table(source)
    id_column = id_column or ID_COLUMN
    if id_column not in columns:
        shown = ", ".join(columns[:8]) + (", ..." if len(columns) > 8 else "")
        raise InputError(f"{source}: no {id_column} column (columns: {shown}); name the id column with --id_column")
    by_label = {participant_label(p): p for p in run_participants}
    seen: dict[str, str] = {}
    for row in rows:
        raw = (row.get(id_column) or "").strip()
        label = participant_label(raw)
        if not label:
            raise InputError(f"{source}: a row with an empty {id_column}")
        if label in seen:
            raise InputError(f"{source}: {seen[label]!r} and {raw!r} name the same participant; keep one row each")
        seen[label] = raw
        row[ID_COLUMN] = by_label.get(label, "sub-" + label)
    others = [c for c in columns if c not in (id_column, ID_COLUMN)]
    with_runs = sorted(set(run_participants))
    without = [p for p in with_runs if participant_label(p) not in seen]
    line = (f"phenotype table {source.name}: {len(with_runs) - len(without)} of {len(with_runs)} participants "
            "with runs have a row")
    if without:
        line += f"; none for {', '.join(without[:5])}{', ...' if len(without) > 5 else ''}"
    return PhenotypeTable([ID_COLUMN, *others], rows, line)
