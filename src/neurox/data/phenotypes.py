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


DECIMAL_COMMA = re.compile(r"-?\d+,\d+")


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of a .csv (commas) or any other text table (tabs); where the header line holds none of
    that delimiter, of the one it holds most of: tabs, commas, or semicolons, as spreadsheets in the locales that
    write decimal commas export CSV (whose ``1,5`` is then read as ``1.5``)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheet exports start with a BOM
            header = f.readline()
            delimiter = "," if path.suffix.lower() == ".csv" else "\t"
            if delimiter not in header:
                delimiter = max(("\t", ",", ";"), key=header.count)
            f.seek(0)
            reader = csv.DictReader(f, delimiter=delimiter)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path}: cannot read the phenotype table ({err})") from None
    if delimiter == ";":
        for row in rows:
            row.update({key: value.replace(",", ".") for key, value in row.items()
                        if isinstance(value, str) and DECIMAL_COMMA.fullmatch(value)})
    return list(reader.fieldnames or []), rows


@dataclass
class PhenotypeTable:
    columns: list[str]
    rows: list[dict[str, str]]
    summary: str  # how many participants with runs have a row

    def write(self, path: Path) -> None:
        write_tsv(path, self.rows, self.columns)


def session_label(value: str) -> str:
    """What identifies a session: without ``ses-``, letters and digits only, lower case (``ses-baselineYear1Arm1``
    and ABCD's ``baseline_year_1_arm_1`` are one session)."""
    return re.sub(r"[^a-z0-9]", "", re.sub(r"^ses[-_]", "", value.strip().lower()))


def phenotype_table(source: Path, runs: list[tuple[str, str]], id_column: str | None = None,
                    session_column: str | None = None) -> PhenotypeTable:
    """The table ``source`` as a store keeps it, for runs of (participant, session): its ids (in ``id_column``,
    default ``participant_id``) renamed to the runs' names, in ``participant_id``, first. With a
    ``session_column`` (or a column named ``session``), a row per session: its sessions renamed to the runs'
    session labels, in ``session``, second."""
    if not source.is_file():
        raise InputError(f"{source}: phenotype table not found")
    columns, rows = read_table(source)
    id_column = id_column or ID_COLUMN
    if session_column is None and "session" in columns:
        session_column = "session"
    for column, option in ((id_column, "--id_column"), (session_column, "--session_column")):
        if column is not None and column not in columns:
            shown = ", ".join(columns[:8]) + (", ..." if len(columns) > 8 else "")
            raise InputError(f"{source}: no {column} column (columns: {shown}); name the column with {option}")
    by_label = {participant_label(p): p for p, _ in runs}
    by_session = {(participant_label(p), session_label(s)): s for p, s in runs}
    unit = "participant" if session_column is None else "participant session"
    seen: dict[tuple[str, str], str] = {}
    for row in rows:
        raw = (row.get(id_column) or "").strip()
        label = participant_label(raw)
        if not label:
            raise InputError(f"{source}: a row with an empty {id_column}")
        key = (label, session_label(row.get(session_column) or "") if session_column else "")
        if key in seen:
            raise InputError(f"{source}: {seen[key]!r} and {raw!r} name the same {unit}; keep one row each")
        seen[key] = raw
        row[ID_COLUMN] = by_label.get(label, "sub-" + label)
        if session_column:
            row["session"] = by_session.get(key, key[1])
    leading = [ID_COLUMN] + (["session"] if session_column else [])
    others = [c for c in columns if c not in (id_column, session_column, *leading)]
    with_runs = sorted({(p, s if session_column else "") for p, s in runs})
    without = [(p, s) for p, s in with_runs if (participant_label(p), session_label(s)) not in seen]
    names = [f"{p}_ses-{s}" if s else p for p, s in without]
    line = (f"phenotype table {source.name}: {len(with_runs) - len(without)} of {len(with_runs)} {unit}s "
            "with runs have a row")
    if without:
        line += f"; none for {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
    return PhenotypeTable([*leading, *others], rows, line)
