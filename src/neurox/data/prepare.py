"""``neurox prepare``: many runs into one store, in parallel, resumable, one bad run never stops
the rest.

A run is finished when its folder appears under ``runs/`` (an atomic rename of a temporary one),
so a re-run after a crash or Ctrl-C skips finished runs, clears half-written temporaries and
redoes the rest. A run whose source file changed since it was prepared is redone. Failures are
kept as one small marker per run and gathered into ``failures.tsv``; ``manifest.tsv`` is rebuilt
from the runs on disk at the end of every invocation, one invocation at a time, so cluster array jobs
(``--shard i/N``) writing into one store leave a manifest of every run behind the last of them.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from neurox import __version__
from neurox.data.confounds import (
    CONFOUNDS_FILE,
    confounds_text,
    drop_leading,
    motion_summary,
    parse_denoising,
    read_confounds,
    run_confounds,
    table_columns,
)
from neurox.data.grid import TargetGrid
from neurox.data.phenotypes import phenotype_table
from neurox.data.preprocess import PrepareOptions, add_frame_signals, computable_confounds, prepare_run
from neurox.data.store import (
    MANIFEST_COLUMNS,
    RUNS_DIR,
    STORE_DEFAULTS,
    STORE_FILE,
    TEMPORARY_PREFIX,
    UNNAMED_TEMPLATE,
    RunReader,
    RunWriter,
    remove,
    run_path,
    write_tsv,
)
from neurox.data.survey import survey
from neurox.data.temporal import resample_table
from neurox.errors import UnreadableRun
from neurox.io.atomic import write_text_atomic
from neurox.io.bids import RunSpec, discover, is_mni_space, task_counts
from neurox.io.nifti import InputError
from neurox.progress import progress as progress_display
from neurox.workers import process_pool

FAILURE_SUFFIX = ".failed.json"
LOCK_FILE = ".tables.lock"  # held while manifest.tsv and failures.tsv are rebuilt
# what every run of a store must share; a second prepare into the store must agree on these
SHARED_KEYS = ("format", "grid", "voxel_size_mm", "origin_mm", "crop_box_mm", "normalization", "denoising",
               "resample_tr", "non_steady_state", "bold_desc")
SETTING_OPTIONS = {"format": "--format", "grid": "--grid or --voxel_size", "voxel_size_mm": "--voxel_size",
                   "origin_mm": "--grid", "crop_box_mm": "--grid or --voxel_size", "normalization": "--normalization",
                   "denoising": "--confounds, --global_signal", "resample_tr": "--resample_tr",
                   "non_steady_state": "--non_steady_state", "bold_desc": "--desc"}  # what sets each, to say so


@dataclass
class PrepareReport:
    store: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    phenotypes: str | None = None  # how many participants with runs have a row in the phenotype table
    survey: list[str] | None = None  # with dry_run: what a prepare would do (neurox.data.survey), nothing written

    @property
    def ok(self) -> bool:
        return not self.failed


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes i/N (for example 0/10), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: i must be in 0..N-1")
    return index, count


def options_from_model(model_dir: str | Path, **overrides) -> PrepareOptions:
    """The input contract of a model directory as prepare options (``--like``)."""
    from neurox.hub import read_config

    contract = read_config(model_dir)["input_contract"]
    voxel = contract.get("voxel_size_mm") or 2.0
    grid = TargetGrid.default(voxel, contract["grid"])
    if contract.get("crop_box"):
        grid = TargetGrid(grid.shape, voxel, tuple(float(axis[0]) for axis in contract["crop_box"]))
    strategy, global_signal = parse_denoising(contract.get("denoising") or "none")
    values = {"grid": grid, "normalization": contract.get("normalization") or "global_zscore",
              "min_frames": int(contract.get("window_frames") or 20), "confounds": strategy,
              "global_signal": global_signal,
              "resample_tr": contract.get("tr") if contract.get("tr_resampled") else None,
              "bold_desc": contract.get("bold_desc") or "preproc"}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return PrepareOptions(**values)


def prepare(
    input_path: str | Path,
    out: str | Path,
    options: PrepareOptions | None = None,
    participants: str | Path | None = None,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    fmt: str = "zarr",
    progress: bool = True,
    task: str | None = None,
    hcp_bold: str = "minimal",
    id_column: str | None = None,
    session_column: str | None = None,
    max_mean_fd: float | None = None,
    dry_run: bool = False,
    space: str | None = None,
    model_space: str | None = None,
) -> PrepareReport:
    """``model_space``: the MNI template of the model whose contract ``options`` are (``--like``): taken where a
    folder's runs are in several, and a warning where they are in another."""
    root = Path(out)
    options = with_store_settings(options or PrepareOptions(), root)
    found = sorted(discover(input_path, task=task, hcp_bold=hcp_bold, space=space, prefer_space=model_space,
                            desc=options.bold_desc), key=lambda s: s.run_id)
    specs = found[shard[0] :: shard[1]]
    template = runs_template(found, input_path)
    if progress:
        print(f"neurox prepare: {len(found)} run(s) found ({task_counts(found)}"
              + (f"; {template}" if template != UNNAMED_TEMPLATE else "") + ")"
              + (f", {len(specs)} in shard {shard[0]}/{shard[1]}" if shard[1] > 1 else ""), file=sys.stderr)
    if model_space and template not in (model_space, UNNAMED_TEMPLATE):
        print(f"warning: the model was trained on runs in {model_space} and these are in {template}: the templates "
              "differ by millimetres; where fMRIPrep wrote both, --space chooses", file=sys.stderr)
    source = phenotype_source(input_path, participants)
    if source is None and (id_column or session_column):
        raise InputError(f"--{'id' if id_column else 'session'}_column: give the phenotype table with --participants")
    # read and checked before the store is made: a table that cannot be joined leaves nothing behind
    phenotypes = phenotype_table(source, [(s.participant_id, s.session) for s in found], id_column,
                                 session_column) if source else None
    if dry_run:
        report = PrepareReport(root, phenotypes=phenotypes.summary if phenotypes else None)
        report.survey = survey(specs, options, lambda spec: is_current(root, spec, fmt), progress)
        return report
    init_store(root, options, fmt, template)
    if max_mean_fd is not None:
        set_motion_threshold(root, max_mean_fd)
    report = PrepareReport(root)
    if phenotypes is not None:
        phenotypes.write(root / "participants.tsv")
        report.phenotypes = phenotypes.summary

    jobs = []  # (function, spec): a run to prepare, or a finished run whose confounds to complete
    half_written = unfinished_runs(root)
    for spec in specs:
        for stale in half_written.get(spec.run_id, []):
            remove(stale)  # left by a crash or Ctrl-C
        if not is_current(root, spec, fmt):
            jobs.append((_prepare_one, spec))
            continue
        report.skipped.append(spec.run_id)
        if confounds_incomplete(root, spec, fmt):
            jobs.append((complete_confounds, spec))

    bar = progress_display(total=len(jobs), desc="prepare", unit="run", disable=not progress or not jobs)
    try:
        if workers <= 1:
            for job, spec in jobs:
                _record(report, root, spec, job, job(spec, options, root, fmt), bar)
        else:
            with process_pool(workers) as pool:
                futures = {pool.submit(job, spec, options, root, fmt): (job, spec) for job, spec in jobs}
                for future in as_completed(futures):
                    job, spec = futures[future]
                    _record(report, root, spec, job, future.result(), bar)
    except BaseException:  # Ctrl-C, or an error no run could be blamed for: the display says it stopped
        bar.close(stopped=True)
        raise
    finally:
        bar.close()
        write_manifest(root, fmt)
    return report


def unfinished_runs(root: Path) -> dict[str, list[Path]]:
    """The temporary folders of runs being written (``RunWriter``: ``.tmp-<run_id>-<pid>``), by run id: from one
    listing of the store, not one a run (40,000 listings of 40,000 entries for a cohort's re-run)."""
    found: dict[str, list[Path]] = {}
    with os.scandir(root / RUNS_DIR) as entries:
        for entry in entries:
            name = entry.name.removeprefix(TEMPORARY_PREFIX)
            if name != entry.name and "-" in name:
                found.setdefault(name.rsplit("-", 1)[0], []).append(Path(entry.path))
    return found


def _prepare_one(spec: RunSpec, options: PrepareOptions, root: Path, fmt: str) -> str | None:
    """Runs in a worker; returns None on success or the one-line error."""
    try:
        prepare_run(spec, options, lambda n: RunWriter(root, spec.run_id, n, options.grid.shape, fmt))
    except InputError as err:
        return str(err)
    except MemoryError:
        return f"{spec.bold}: out of memory while preparing"
    return None


def _record(report: PrepareReport, root: Path, spec: RunSpec, job, error: str | None, bar) -> None:
    if job is complete_confounds:  # the run stays as it was; a table that does not fit it is reported
        if error:
            bar.write(f"neurox prepare: {error}; the run is kept with the confounds it had")
        bar.update(1)
        return
    marker = root / RUNS_DIR / f"{spec.run_id}{FAILURE_SUFFIX}"
    if error is None:
        report.done.append(spec.run_id)
        marker.unlink(missing_ok=True)
    else:
        report.failed[spec.run_id] = error
        write_text_atomic(marker, json.dumps({"run_id": spec.run_id, "participant_id": spec.participant_id,
                                              "source": str(spec.bold), "error": error}))
        bar.write(f"failed: {error}")
    bar.update(1)


def with_store_settings(options: PrepareOptions, root: Path) -> PrepareOptions:
    """``options`` with what was left to the store decided: the leading non-steady-state frames are dropped in a
    new store, and treated as an existing store's runs were (a store from before the setting kept them)."""
    if options.non_steady_state is not None:
        return options
    path = root / STORE_FILE
    setting = json.loads(path.read_text()).get("non_steady_state", STORE_DEFAULTS["non_steady_state"]) \
        if path.is_file() else "drop"
    return replace(options, non_steady_state=setting)


def runs_template(specs: list[RunSpec], input_path) -> str:
    """The MNI template of the runs, by fMRIPrep's name for it (``MNI152NLin2009cAsym``; the HCP pipelines' runs
    are ``MNI152NLin6Asym``), or ``UNNAMED_TEMPLATE`` where no file name says. A store holds one: the templates
    place the brain millimetres apart, which a model would read as anatomy."""
    named = sorted({spec.space for spec in specs if spec.space and is_mni_space(spec.space)})
    if len(named) > 1:
        raise InputError(f"{input_path}: runs in several MNI templates ({', '.join(named)}); a store holds one: "
                         "prepare each into a store of its own, or choose one with --space")
    return named[0] if named else UNNAMED_TEMPLATE


def init_store(root: Path, options: PrepareOptions, fmt: str, template: str = UNNAMED_TEMPLATE) -> None:
    wanted = {"neurox_version": __version__, "format": fmt, "space": template, "orientation": "RAS",
              "dtype": "float16", "channels": 1, **options.to_dict()}
    path = root / STORE_FILE
    if path.is_file():
        existing = json.loads(path.read_text())
        for key in SHARED_KEYS:
            had = existing.get(key, STORE_DEFAULTS.get(key))
            if had != wanted.get(key):
                option = SETTING_OPTIONS.get(key, "a prepare option")
                raise ValueError(
                    f"{root}: this store was prepared with {key}={had} ({option}), not {wanted.get(key)}; give the "
                    "same to add runs to it, or another --out for other settings"
                )
        had = existing.get("space", UNNAMED_TEMPLATE)
        if UNNAMED_TEMPLATE not in (had, template) and had != template:
            raise ValueError(f"{root}: this store holds runs in {had}, and these are in {template}; "
                             "use another --out for them")
        return
    (root / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(wanted, indent=2) + "\n")


def is_current(root: Path, spec: RunSpec, fmt: str) -> bool:
    """Finished, readable (a truncated or damaged file is redone), and prepared from the file as it is now."""
    path = run_path(root, spec.run_id, fmt)
    if not _meta_file(path, fmt).is_file():
        return False
    try:
        reader = RunReader(path)  # reads the frame index, whose checksum fails where the shard was cut short
    except UnreadableRun:
        return False
    source = reader.attributes.get("source", {})
    try:
        stat = spec.bold.stat()
    except OSError:
        return True  # the source is gone; what was prepared from it stays
    return source.get("size") == stat.st_size and source.get("mtime_ns") == stat.st_mtime_ns


def confounds_incomplete(root: Path, spec: RunSpec, fmt: str) -> bool:
    """Whether a finished run lacks confounds it would get now: a table that was not there when it was
    prepared, or columns its frames give that an earlier neurox did not compute (HCP tissue signals)."""
    if spec.confounds is None:
        return False
    path = run_path(root, spec.run_id, fmt)
    stored = path / CONFOUNDS_FILE
    if not stored.is_file():
        return True
    n_frames, tr, first = source_timing(_attributes(path, fmt)[1])
    return bool(computable_confounds(spec, table_columns(stored), n_frames - first, tr))


def source_timing(attributes: dict) -> tuple[int, float | None, int]:
    """A prepared run's source frames and TR, before any resampling in time, and its leading frames left out."""
    return (attributes["source"]["shape"][3], attributes["source"].get("tr", attributes["tr"]),
            attributes.get("non_steady_state_dropped", 0))


def _meta_file(path: Path, fmt: str) -> Path:
    return path / ("zarr.json" if fmt == "zarr" else "attributes.json")


def _attributes(path: Path, fmt: str) -> tuple[dict, dict]:
    """A finished run's metadata file as read, and the attributes in it."""
    meta = json.loads(_meta_file(path, fmt).read_text())
    return meta, meta.get("attributes", meta)


def complete_confounds(spec: RunSpec, options: PrepareOptions, root: Path, fmt: str) -> str | None:
    """Give a finished run the confounds ``confounds_incomplete`` finds missing, without touching its frames
    (runs in a worker: the frames are read once where they give a column); returns the one-line error of a
    table that does not fit."""
    path = run_path(root, spec.run_id, fmt)
    meta, attributes = _attributes(path, fmt)
    stored = path / CONFOUNDS_FILE
    n_frames, tr, first = source_timing(attributes)
    in_time = attributes.get("resampled_in_time", False)  # the stored table is resampled: start from the source
    try:
        if stored.is_file() and not in_time:
            table = read_confounds(stored)
        else:  # the run's frames start where they started when it was prepared
            table = drop_leading(run_confounds(spec.confounds, n_frames, spec.bold.name), first)
            attributes["source"]["confounds"] = str(spec.confounds.resolve())
        if not table:
            return None
        computed = add_frame_signals(spec, table, tr, options.block_frames, first)
    except InputError as err:
        return str(err)
    write_text_atomic(stored, confounds_text(resample_table(table, tr, attributes["tr"]) if in_time else table))
    attributes.update(motion=motion_summary(table), confounds=sorted(table),
                      computed_confounds=attributes.get("computed_confounds", []) + computed)
    write_text_atomic(_meta_file(path, fmt), json.dumps(meta))
    return None


def phenotype_source(input_path, participants) -> Path | None:
    """The phenotype table: the one given, else ``participants.tsv`` of a BIDS folder given as input, else that of
    the raw dataset holding it (``bids/derivatives/fmriprep`` -> ``bids/participants.tsv``: fMRIPrep does not
    copy the table into its outputs)."""
    if participants:
        return Path(participants)
    folder = Path(input_path).resolve()
    if not folder.is_dir():
        return None
    nearest_derivatives = next((p for p in (folder, *folder.parents[:2]) if p.name == "derivatives"), None)
    for candidate in (folder / "participants.tsv",
                      *([nearest_derivatives.parent / "participants.tsv"] if nearest_derivatives else [])):
        if candidate.is_file():
            return candidate
    return None


def set_motion_threshold(root: Path, max_mean_fd: float) -> None:
    """Record in store.json the mean framewise displacement (mm) above which a run is excluded (0: none)."""
    if max_mean_fd < 0:
        raise ValueError(f"--max_mean_fd {max_mean_fd}: give a displacement in mm (0 for no threshold)")
    info = json.loads((root / STORE_FILE).read_text())
    info.pop("max_mean_fd", None)
    if max_mean_fd > 0:
        info["max_mean_fd"] = max_mean_fd
    write_text_atomic(root / STORE_FILE, json.dumps(info, indent=2) + "\n")


def write_manifest(root: Path, fmt: str) -> None:
    """Rebuild manifest.tsv and failures.tsv from what is on disk. A run whose mean framewise displacement is
    above the store's ``max_mean_fd`` gets the status ``excluded``: its frames stay, no command reads it."""
    with one_writer(root):
        _write_manifest(root, fmt)


@contextmanager
def one_writer(root: Path):
    """Held while the store's tables are rebuilt: the shards of an array job end together, and one that listed
    the runs before another's last run appeared must not write its older tables after the other's. Each shard
    rebuilds them after its own runs are on disk, so the last to take the lock lists every run. Where the file
    system has no locks (some NFS mounts), the tables are rebuilt as before, unguarded."""
    with open(root / LOCK_FILE, "a") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield  # closing the file releases the lock


def _write_manifest(root: Path, fmt: str) -> None:
    threshold = json.loads((root / STORE_FILE).read_text()).get("max_mean_fd")
    rows, failures = [], []
    runs = root / RUNS_DIR
    for path in sorted(runs.glob(f"*.{fmt}")):
        a = _attributes(path, fmt)[1]
        rows.append({
            "participant_id": a["participant_id"], "session": a["session"], "run": a["run"], "run_id": a["run_id"],
            "path": str(path.relative_to(root)), "n_frames": a["n_frames"], "tr": a["tr"] or "",
            "shape": "x".join(str(s) for s in [*a["grid"], a["n_frames"]]),
            "status": "excluded" if threshold and a.get("motion", {}).get("mean_fd", 0) > threshold else "ok",
            **a.get("motion", {}), "non_steady_state_dropped": a.get("non_steady_state_dropped", 0),
            "source": a["source"]["path"],
        })
    done = {row["run_id"] for row in rows}
    for marker in sorted(runs.glob(f"*{FAILURE_SUFFIX}")):
        failure = json.loads(marker.read_text())
        if failure["run_id"] in done:
            continue
        failures.append(failure)
        rows.append({"participant_id": failure["participant_id"], "run_id": failure["run_id"],
                     "status": "failed", "source": failure["source"]})
    write_tsv(root / "manifest.tsv", rows, MANIFEST_COLUMNS)
    write_tsv(root / "failures.tsv", failures, ["run_id", "participant_id", "source", "error"])
