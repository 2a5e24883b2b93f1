"""An output folder says what it holds, so that no result is overwritten by, or mixed with, another's.

A command that writes a folder (``baseline``, ``probe``, ``connectivity``, ``explain``) records in it which
command wrote it and the settings its results depend on (``.neurox-outputs.json``); ``finetune`` and ``pretrain``
record their command only (their own checkpoints decide what a resumed run may change). Run again into the same
folder with the same settings, it recomputes or resumes; with other settings, or as another command, it is
refused in one line that names the folder and what differs. A record in a folder that holds nothing else (a
run that failed before writing anything) binds nothing: the next run takes the folder over.
"""

from __future__ import annotations

import json
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
