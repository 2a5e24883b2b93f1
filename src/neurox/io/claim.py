"""An output folder says what it holds, so that no result is overwritten by, or mixed with, another's.

A command that writes a folder (``baseline``, ``probe``, ``connectivity``, ``explain``) records in it which
command wrote it and the settings its results depend on (``.neurox-outputs.json``); ``finetune`` and ``pretrain``
record their command only (their own checkpoints decide what a resumed run may change). Run again into the same
folder with the same settings, it recomputes or resumes; with other settings, or as another command, it is
refused in one line that names the folder and what differs. A record in a folder that holds nothing else (a
run that failed before writing anything) binds nothing: the next run takes the folder over.

A command that writes one file (``embed``, ``predict``) keeps its parts, participant by participant, in a folder
beside it until the file is written (``kept_parts``), so that an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from neurox.io.atomic import write_text_atomic

RECORD_FILE = ".neurox-outputs.json"


def claim_folder(out: str | Path, command: str, settings: dict) -> None:
    """Record that ``out`` holds the outputs of ``neurox command`` with ``settings`` (JSON-able values; paths as
    strings), or refuse, in one line, when it holds those of another command or of other settings."""
    out = Path(out)
    now = {"command": command, "settings": json.loads(json.dumps(settings, default=str))}
    record = out / RECORD_FILE
    if record.is_file() and _holds_outputs(out):
        before = json.loads(record.read_text())
        if before.get("command") != command:
            raise ValueError(f"{out} holds the outputs of neurox {before.get('command')}; choose another --out")
        had = before.get("settings", {})
        changed = [key for key in {**had, **now["settings"]} if had.get(key) != now["settings"].get(key)]
        if changed:
            raise ValueError(f"{out} holds the outputs of neurox {command} with other settings "
                             f"({', '.join(changed)} differ); choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record, json.dumps(now, indent=2) + "\n")


def resolved(path: str | Path | None) -> str | None:
    """A path as a setting: absolute, so that ``store`` and ``./store`` are the same setting."""
    return str(Path(path).resolve()) if path else None


def _holds_outputs(out: Path) -> bool:
    return any(p.is_file() and p.name != RECORD_FILE for p in out.rglob("*"))


def kept_parts(out: Path, settings: dict) -> Path:
    """The folder beside the file ``out`` (``.{name}.parts``) where a command keeps each participant's part until
    ``out`` is written, so that an interrupted run resumes; emptied first when it holds parts of other ``settings``
    (another model's or store's). The command removes it once ``out`` is written (``discard_parts``)."""
    cache = parts_folder(out)
    record = cache / "settings.json"
    if cache.is_dir() and (not record.is_file() or json.loads(record.read_text()) != settings):
        shutil.rmtree(cache)
    if not record.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        write_text_atomic(record, json.dumps(settings) + "\n")
    return cache


def discard_parts(out: str | Path) -> None:
    shutil.rmtree(parts_folder(Path(out)), ignore_errors=True)


def parts_folder(out: Path) -> Path:
    return out.with_name(f".{out.name}.parts")
