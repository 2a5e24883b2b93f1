"""Finding the runs to prepare: a BIDS derivatives folder (fMRIPrep layout), one NIfTI, or a TSV
manifest. Every form ends as a list of ``RunSpec``."""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from neurox.io.nifti import InputError

# a derivative BOLD run: fMRIPrep's desc-preproc, or another pipeline's denoised one (desc-smoothAROMAnonaggr, ...)
BOLD_RUN = re.compile(r"_desc-([A-Za-z0-9]+)_bold\.nii(?:\.gz)?$")
# a run's confounds table: fMRIPrep 20.2 and later, then the name fMRIPrep 1.4 to 20.1 gave the same columns
CONFOUNDS_NAMES = ("_desc-confounds_timeseries.tsv", "_desc-confounds_regressors.tsv")
# folders that hold no preprocessed BOLD run, not walked into: FreeSurfer's (sourcedata/freesurfer), fMRIPrep's
# reports, the other BIDS datatypes, an HCP subject's folders (its runs are found by neurox.io.hcp), and nipype's
# working folders (*_wf)
NO_RUNS = {"sourcedata", "freesurfer", "figures", "log", "logs", "anat", "fmap", "dwi", "perf", "beh", "T1w", "T2w",
           "MNINonLinear", "unprocessed", "Diffusion", "release-notes"}
ENTITY = re.compile(r"(?:^|_)([a-zA-Z0-9]+)-([a-zA-Z0-9.+]+)")


@dataclass(frozen=True)
class RunSpec:
    participant_id: str  # with the "sub-" prefix, as in participants.tsv
    session: str
    run: str
    run_id: str  # unique within a store, filename-safe
    bold: Path
    mask: Path | None = None
    tr: float | None = None
    confounds: Path | None = None
    space: str | None = None
    task: str = ""  # the BIDS task label ("rest"), or what an HCP run folder's name says
    segmentation: Path | None = None  # FreeSurfer labels on the run's grid (HCP's wmparc): tissue signals


def entities(path: str | Path) -> dict[str, str]:
    name = Path(path).name.split(".nii")[0]
    return {key: value for key, value in ENTITY.findall(name)}


def is_mni_space(space: str | None) -> bool:
    return space is None or space.upper().startswith("MNI")


def _run_id(ent: dict[str, str], fallback: str) -> str:
    parts = [f"{k}-{ent[k]}" for k in ("sub", "ses", "task", "acq", "dir", "rec", "run", "echo") if k in ent]
    return "_".join(parts) if "sub" in ent else re.sub(r"[^A-Za-z0-9_.-]", "_", fallback)


def _sibling(bold: Path, suffix_from: str, suffix_to: str) -> Path | None:
    candidate = bold.with_name(bold.name.replace(suffix_from, suffix_to))
    return candidate if candidate != bold and candidate.exists() else None


def sidecar_of(bold: Path) -> Path:
    """The run's JSON sidecar (which may not exist)."""
    return bold.with_name(bold.name.split(".nii")[0] + ".json")


def sidecar_tr(bold: Path) -> float | None:
    sidecar = sidecar_of(bold)
    if not sidecar.is_file():
        return None
    try:
        value = json.loads(sidecar.read_text()).get("RepetitionTime")
    except json.JSONDecodeError as err:
        raise InputError(f"{sidecar}: not valid JSON ({err})") from None
    return float(value) if value is not None else None


def spec_for_bold(bold: Path, mask: Path | None = None, participant_id: str | None = None,
                  session: str | None = None, run: str | None = None) -> RunSpec:
    ent = entities(bold)
    derivative = BOLD_RUN.search(bold.name)
    suffix = derivative.group(0) if derivative else None
    if mask is None and suffix:
        mask = _sibling(bold, suffix, "_desc-brain_mask" + suffix[suffix.index(".nii"):])
    confounds = None
    if suffix:
        stem = bold.name[: -len(suffix)]
        stem = re.sub(r"_(space|cohort|res)-[^_]+", "", stem)  # the table is the run's, in no space
        confounds = next((c for c in (bold.with_name(stem + name) for name in CONFOUNDS_NAMES) if c.exists()), None)
    pid = participant_id or (f"sub-{ent['sub']}" if "sub" in ent else bold.name.split(".nii")[0])
    return RunSpec(
        participant_id=pid,
        session=session if session is not None else ent.get("ses", ""),
        run=run if run is not None else ent.get("run", ""),
        run_id=_run_id(ent, bold.name.split(".nii")[0]),
        bold=bold,
        mask=mask,
        tr=sidecar_tr(bold),
        confounds=confounds,
        space=template_of(ent),
        task=ent.get("task", ""),
    )


def template_of(ent: dict[str, str]) -> str | None:
    """The template a run's entities name: ``MNI152NLin6Asym``, or with its cohort where a template has several
    (``MNIPediatricAsym:cohort-2``, one age range: each is a template of its own)."""
    if "space" not in ent:
        return None
    return ent["space"] + (f":cohort-{ent['cohort']}" if "cohort" in ent else "")


def space_label(path: str | Path) -> str:
    """``MNI152NLin6Asym:res-2``: a run's output space as fMRIPrep's ``--output-spaces`` names it."""
    ent = entities(path)
    return (template_of(ent) or "") + (f":res-{ent['res']}" if "res" in ent else "")


def discover_bids(root: Path, space: str | None = None, prefer_space: str | None = None,
                  desc: str = "preproc") -> list[RunSpec]:
    """Every ``*_space-MNI*_desc-<desc>_bold.nii[.gz]`` under ``root``; with ``space``
    (``MNI152NLin2009cAsym``, or ``MNI152NLin6Asym:res-2`` with its resolution) only the runs in it. fMRIPrep
    writes a run once per output space, so a run found in several is an error naming them (which one a model
    reads is the user's choice, not ours), unless one of them is in ``prefer_space`` (the template a model
    was trained on, for ``prepare --like``)."""
    if space is not None and not is_mni_space(space):
        raise InputError(f"--space {space}: models read runs in an MNI space (MNI152NLin2009cAsym, "
                         "MNI152NLin6Asym, ...)")
    every_mni = []
    for path in preprocessed_bolds(root, desc):
        bold_space = entities(path).get("space")
        if bold_space and is_mni_space(bold_space):
            every_mni.append(path)  # fMRIPrep also writes T1w/fsnative runs beside the MNI ones
    # --space names a space with its resolution, or a template: its one resolution, or the one written without
    # a res- entity (fMRIPrep's default, the BOLD's own voxel size) where it has several
    chosen = every_mni if space is None else (
        [p for p in every_mni if space_label(p) == space]
        or [p for p in every_mni if template_of(entities(p)) == space])
    found = [spec_for_bold(path) for path in chosen]
    if space is not None and every_mni and not found:
        labels = sorted({space_label(path) for path in every_mni})
        raise InputError(f"{root}: no runs in space {space} (found: {', '.join(labels)})")
    runs: dict[str, list[RunSpec]] = {}
    for spec in found:
        runs.setdefault(spec.run_id, []).append(spec)
    if prefer_space is not None:
        runs = {run_id: [s for s in specs if s.space == prefer_space] or specs for run_id, specs in runs.items()}
        found = [spec for specs in runs.values() for spec in specs]
    several = [run_id for run_id, specs in runs.items() if len(specs) > 1]
    if several:
        these = sorted({space_label(spec.bold) for spec in runs[several[0]]})
        runs_named = f"{several[0]} and {len(several) - 1} other run(s) are" if len(several) > 1 else f"{several[0]} is"
        raise InputError(f"{root}: {runs_named} in several MNI output spaces ({', '.join(these)}); choose one with "
                         f"--space, e.g. --space {these[0]}")
    return found


def preprocessed_bolds(root: Path, desc: str | None = "preproc") -> list[Path]:
    """Every ``*_desc-<desc>_bold.nii[.gz]`` (any desc with None) under ``root``, sorted, without walking into the
    folders that hold none (``NO_RUNS``, hidden ones): a cohort's FreeSurfer outputs beside fMRIPrep's, or an HCP
    release, are millions of files, which a cluster's file system lists slowly, and every shard of an array job
    lists them. Linked folders are followed (a cohort put together from links), each real folder once (a link to
    a folder above it is no loop)."""
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        status = os.stat(folder)
        if (status.st_dev, status.st_ino) in seen:
            subfolders[:] = []
            continue
        seen.add((status.st_dev, status.st_ino))
        subfolders[:] = [name for name in subfolders if may_hold_runs(name)]
        found += [Path(folder) / name for name in files
                  if (match := BOLD_RUN.search(name)) and desc in (None, match.group(1))]
    return sorted(found)


def may_hold_runs(folder_name: str) -> bool:
    """Whether ``preprocessed_bolds`` walks into a folder of this name."""
    return folder_name not in NO_RUNS and not folder_name.startswith(".") and not folder_name.endswith("_wf")


def read_manifest(path: Path) -> list[RunSpec]:
    """A TSV with columns participant_id, path and optional session, run, mask, confounds (an fMRIPrep
    confounds table; found beside an fMRIPrep-named run without it); relative paths are relative to the TSV."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's export starts with a BOM
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise InputError(f"{path}: the manifest has no rows")
    missing = {"participant_id", "path"} - set(rows[0])
    if missing:
        raise InputError(f"{path}: the manifest lacks column(s) {', '.join(sorted(missing))}")
    specs = []
    for row in rows:
        bold = (path.parent / row["path"]).resolve() if not Path(row["path"]).is_absolute() else Path(row["path"])
        mask = row.get("mask") or None
        if mask:
            mask = (path.parent / mask).resolve() if not Path(mask).is_absolute() else Path(mask)
        spec = spec_for_bold(bold, mask=mask, participant_id=row["participant_id"],
                             session=row.get("session") or "", run=row.get("run") or "")
        if row.get("confounds"):
            confounds = Path(row["confounds"])
            confounds = confounds if confounds.is_absolute() else (path.parent / confounds).resolve()
            spec = replace(spec, confounds=confounds)
        run_id = "_".join(p for p in (row["participant_id"], _tag("ses", spec.session), _tag("run", spec.run)) if p)
        specs.append(replace(spec, run_id=re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)))
    return specs


def _tag(key: str, value: str) -> str:
    return f"{key}-{value}" if value else ""


def discover(input_path: str | Path, task: str | None = None, hcp_bold: str = "minimal",
             space: str | None = None, prefer_space: str | None = None, desc: str = "preproc") -> list[RunSpec]:
    """Runs from a BIDS derivatives folder (fMRIPrep), an HCP-pipeline folder, a single NIfTI file, or a
    TSV manifest; with ``task``, only the runs of that task; with ``space``, a folder's runs in that space, with
    ``desc`` its runs of that ``desc-`` (``discover_bids``)."""
    from neurox.io.hcp import discover_hcp, hcp_layout

    path = Path(input_path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if space is not None and not path.is_dir():
        raise InputError(f"--space {space}: it chooses among the output spaces of an fMRIPrep folder, and {path} "
                         "is a file")
    if path.is_dir():
        specs = discover_bids(path, space, prefer_space, desc) + discover_hcp(path, hcp_bold)
        if not specs:
            others = sorted({BOLD_RUN.search(p.name).group(1) for p in preprocessed_bolds(path, None)})
            hint = f"; found desc-{', desc-'.join(others)} runs: choose with --desc {others[0]}" if others else ""
            raise InputError(f"{path}: no fMRIPrep runs (*_space-MNI*_desc-{desc}_bold.nii[.gz]) and no HCP-pipeline "
                             f"runs ({hcp_layout(hcp_bold)}) found under this folder{hint}")
    elif path.suffix == ".tsv":
        specs = read_manifest(path)
    elif path.name.endswith((".nii", ".nii.gz")):
        specs = [spec_for_bold(path)]
    else:
        raise InputError(f"{path}: expected a BIDS derivatives or HCP folder, a .nii[.gz] file or a .tsv manifest")
    if task is not None:
        found = sorted({s.task or "no task" for s in specs})
        specs = [s for s in specs if s.task == task]
        if not specs:
            raise InputError(f"{path}: no runs of task {task!r} (tasks found: {', '.join(found)})")
    duplicates = sorted(i for i, n in Counter(s.run_id for s in specs).items() if n > 1)
    if duplicates:
        raise InputError(f"{path}: several runs share the id {duplicates[0]}; give session/run to tell them apart")
    return specs


def task_counts(specs: list[RunSpec]) -> str:
    """``rest 4, wm 2``: how many runs of each task, for prepare's first line."""
    counts: dict[str, int] = {}
    for spec in specs:
        counts[spec.task or "no task"] = counts.get(spec.task or "no task", 0) + 1
    return ", ".join(f"{t} {n}" for t, n in sorted(counts.items()))
