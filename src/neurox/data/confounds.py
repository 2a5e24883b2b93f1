"""fMRIPrep confounds: what ``prepare`` keeps of them, and the denoising strategies of connectivity.

``prepare`` keeps, per run, the columns the strategies below use (motion and its expansions, framewise
displacement, DVARS, tissue and global signals, the first five anatomical CompCor components, the
cosine drift basis, non-steady-state outliers) in the store, beside the frames they describe, and the
run's mean and largest framewise displacement in ``manifest.tsv`` for quality control.

A strategy names nuisance regressors, removed from each parcel's series by least squares with an
intercept, and which frames to keep (after nilearn's ``load_confounds_strategy``, whose definitions it
follows where it names the same thing):

- ``simple``: the 24 motion parameters (6 rigid-body, their derivatives, the squares of both), white
  matter and CSF, the cosine basis (fMRIPrep's 128 s high-pass), and each non-steady-state frame dropped;
- ``scrubbing``: ``simple``, and every frame with framewise displacement above ``fd_threshold`` (mm)
  dropped (censored) before the regression;
- ``compcor``: the 24 motion parameters, the first five anatomical CompCor components and the cosine
  basis, non-steady-state frames dropped;
- ``global_signal=True`` adds the global signal to any of them (alone with ``none``).

Removing regressors from a parcel's mean series equals removing them from each voxel and then
averaging (least squares is linear), so denoising at the parcel level is exact and cheap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neurox.io.nifti import InputError

CONFOUNDS_FILE = "confounds.tsv"  # inside a run's folder in the store
STRATEGIES = ("none", "simple", "scrubbing", "compcor")
MOTION = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
MOTION_24 = tuple(f"{m}{suffix}" for m in MOTION for suffix in ("", "_derivative1", "_power2",
                                                                     "_derivative1_power2"))
KEPT = re.compile(r"^(trans_[xyz]|rot_[xyz]|csf|white_matter|global_signal)(_derivative1)?(_power2)?$"
                  r"|^(framewise_displacement|dvars|std_dvars)$|^a_comp_cor_0[0-4]$|^cosine\d+$"
                  r"|^non_steady_state_outlier\d+$")
MIN_KEPT_FRACTION = 0.5  # a run with fewer of its frames left after scrubbing is left out
OUTLIER_PREFIX = "non_steady_state_outlier"
NON_STEADY_STATE = ("drop", "keep")  # what prepare does with a run's leading non-steady-state frames


@dataclass(frozen=True)
class Denoising:
    """How connectivity treats each run's series: ``strategy`` (see above), the scrubbing threshold in
    mm of framewise displacement, and whether the global signal is regressed too."""

    strategy: str = "none"
    fd_threshold: float = 0.5
    global_signal: bool = False

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown confounds strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if not self.fd_threshold > 0:
            raise ValueError(f"--fd_threshold {self.fd_threshold}: give a displacement in mm, above 0")

    @property
    def active(self) -> bool:
        """Whether it changes anything (else no confounds need reading)."""
        return self.strategy != "none" or self.global_signal

    def apply(self, series: np.ndarray, table: dict[str, np.ndarray] | None, source: str) -> np.ndarray:
        """The run's denoised series (its kept frames); a one-line ``InputError`` naming the run when
        its confounds are missing, lack a column, or leave too few frames."""
        if not self.active:
            return series
        if table is None:
            raise InputError(f"{source}: no confounds stored for --confounds {self.strategy} (the run was prepared "
                             "without an fMRIPrep desc-confounds_timeseries.tsv beside it)")
        design, keep = nuisance_design(table, self.strategy, self.fd_threshold, self.global_signal, source)
        if keep.sum() < MIN_KEPT_FRACTION * len(keep):
            raise InputError(f"{source}: only {int(keep.sum())} of {len(keep)} frames left after scrubbing at "
                             f"{self.fd_threshold} mm")
        return denoise(series, design, keep)


def read_confounds(path: str | Path) -> dict[str, np.ndarray]:
    """The kept columns of a confounds TSV, ``n/a`` as NaN (fMRIPrep writes it in the first row of
    derivatives and framewise displacement); an HCP ``Movement_Regressors*.txt`` as the same columns."""
    path = Path(path)
    if path.name.startswith("Movement_Regressors"):
        return read_hcp_motion(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the confounds table ({err})") from None
    if not lines:
        raise InputError(f"{path}: the confounds table is empty")
    header = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    table = {}
    for i, name in enumerate(header):
        if not KEPT.match(name):
            continue
        try:
            table[name] = np.array([np.nan if r[i] in ("n/a", "") else float(r[i]) for r in rows])
        except (ValueError, IndexError):
            raise InputError(f"{path}: column {name!r} holds a value that is not a number") from None
    return table


def table_columns(path: str | Path) -> set[str]:
    """The kept columns ``read_confounds`` would give, from the header alone (what a dry run needs)."""
    path = Path(path)
    if path.name.startswith("Movement_Regressors"):
        return {*MOTION_24, "framewise_displacement"}
    try:
        with open(path) as file:
            header = file.readline().rstrip("\n").split("\t")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the confounds table ({err})") from None
    return {name for name in header if KEPT.match(name)}


HEAD_RADIUS_MM = 50.0  # rotations to displacement on a sphere of this radius (Power et al. 2012, as fMRIPrep)


def read_hcp_motion(path: Path) -> dict[str, np.ndarray]:
    """An HCP ``Movement_Regressors.txt`` (one row per frame: x, y, z translation in mm, then rotation about
    x, y, z in degrees, then their derivatives) as fMRIPrep's columns: the six parameters (rotations in
    radians), their backward differences (n/a in the first frame), the squares of both, and framewise
    displacement (Power's: the absolute differences summed, rotations as arc length at 50 mm)."""
    try:
        values = np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read the HCP motion parameters ({err})") from None
    if values.shape[1] < 6 or not np.isfinite(values[:, :6]).all():
        raise InputError(f"{path}: expected 6 or 12 columns of numbers (translations in mm, rotations in degrees), "
                         f"found {values.shape[1]}")
    parameters = np.column_stack([values[:, :3], np.deg2rad(values[:, 3:6])])
    difference = np.vstack([np.full((1, 6), np.nan), np.diff(parameters, axis=0)])
    table = {}
    for i, name in enumerate(MOTION):
        table[name] = parameters[:, i]
        table[f"{name}_derivative1"] = difference[:, i]
        table[f"{name}_power2"] = parameters[:, i] ** 2
        table[f"{name}_derivative1_power2"] = difference[:, i] ** 2
    table["framewise_displacement"] = (np.abs(difference[:, :3]).sum(1)
                                       + HEAD_RADIUS_MM * np.abs(difference[:, 3:]).sum(1))
    return table


def run_confounds(path: Path, n_frames: int, bold_name: str) -> dict[str, np.ndarray]:
    """The kept columns of a run's confounds table, refused in one line when its rows are not the run's frames."""
    table = read_confounds(path)
    rows = len(next(iter(table.values()))) if table else n_frames
    if rows != n_frames:
        raise InputError(f"{path}: {rows} rows for the {n_frames} frames of {bold_name}")
    return table


def leading_non_steady(path: str | Path) -> int:
    """How many frames at the start of a run its confounds table marks as non-steady-state: fMRIPrep flags the
    first frames, brighter while the magnetisation settles, one ``non_steady_state_outlierNN`` column each. A
    marked frame after an unmarked one is not counted (the strategies below still treat it). From the header and
    the first rows only: a dry run reads a cohort's tables, which run to megabytes each."""
    try:
        with open(path) as file:
            header = file.readline().rstrip("\n").split("\t")
            columns = [i for i, name in enumerate(header) if name.startswith(OUTLIER_PREFIX)]
            count = 0
            for line in file if columns else ():
                cells = line.rstrip("\n").split("\t")
                if not any(cells[i] not in ("n/a", "") and float(cells[i]) != 0 for i in columns):
                    break
                count += 1
    except (OSError, UnicodeDecodeError, ValueError, IndexError) as err:
        raise InputError(f"{path}: cannot read the non-steady-state columns of the confounds table ({err})") from None
    return count


def drop_leading(table: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """The table from frame ``count`` on, less the outlier columns that then mark nothing."""
    rows = {name: values[count:] for name, values in table.items()}
    return {name: values for name, values in rows.items()
            if not (name.startswith(OUTLIER_PREFIX) and not np.nan_to_num(values).any())}


def confounds_text(table: dict[str, np.ndarray]) -> str:
    """The table as TSV (``n/a`` for NaN), as ``prepare`` stores it."""
    names = list(table)
    rows = ["\t".join(names)]
    for t in range(len(next(iter(table.values()))) if table else 0):
        rows.append("\t".join("n/a" if np.isnan(table[n][t]) else f"{table[n][t]:.8g}" for n in names))
    return "\n".join(rows) + "\n"


def motion_summary(table: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean and largest framewise displacement (mm) of a run, when its table has it."""
    fd = table.get("framewise_displacement")
    if fd is None or np.all(np.isnan(fd)):
        return {}
    return {"mean_fd": round(float(np.nanmean(fd)), 4), "max_fd": round(float(np.nanmax(fd)), 4)}


def nuisance_design(table: dict[str, np.ndarray], strategy: str, fd_threshold: float = 0.5,
                    global_signal: bool = False, source: str = "confounds") -> tuple[np.ndarray, np.ndarray]:
    """The regressors (frames, k) of a strategy and the frames to keep (frames,) bool."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown confounds strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    n = len(next(iter(table.values()))) if table else 0
    wanted = []
    if strategy != "none":
        wanted = list(MOTION_24) + sorted(c for c in table if c.startswith("cosine"))
        wanted += ["white_matter", "csf"] if strategy != "compcor" else [f"a_comp_cor_0{i}" for i in range(5)]
    wanted += ["global_signal"] if global_signal else []
    missing = [c for c in wanted if c not in table]
    if missing:
        raise InputError(f"{source}: no column(s) {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} "
                         f"for --confounds {strategy}")
    keep = np.ones(n, dtype=bool)
    for column in (c for c in table if c.startswith(OUTLIER_PREFIX) and strategy != "none"):
        keep &= table[column] == 0
    if strategy == "scrubbing":
        if "framewise_displacement" not in table:
            raise InputError(f"{source}: no framewise_displacement column for --confounds scrubbing")
        keep &= ~(np.nan_to_num(table["framewise_displacement"]) > fd_threshold)
    # derivatives are n/a in the first frame: 0 there, as fMRIPrep's users and nilearn fill them
    design = np.nan_to_num(np.stack([table[c] for c in wanted], axis=1)) if wanted else np.zeros((n, 0))
    return design, keep


INPUT_STRATEGIES = ("none", "simple", "compcor")  # what prepare can remove from the model's input


def denoising_name(strategy: str, global_signal: bool) -> str:
    """How a store's input was denoised, as its store.json and a model's input contract say it:
    ``none``, ``simple``, ``compcor``, ``global_signal`` or ``simple+global_signal``..."""
    if strategy not in INPUT_STRATEGIES:
        hint = " (censoring removes frames a window needs; scrubbing is for connectivity and the baseline)" \
            if strategy == "scrubbing" else ""
        raise ValueError(f"--confounds {strategy}: prepare denoises with one of {', '.join(INPUT_STRATEGIES)}{hint}")
    parts = [strategy] if strategy != "none" else []
    return "+".join(parts + ["global_signal"] * global_signal) or "none"


def parse_denoising(name: str) -> tuple[str, bool]:
    """(strategy, global signal) of a name ``denoising_name`` made: ``simple+global_signal`` -> (simple, True)."""
    return name.replace("global_signal", "").strip("+") or "none", "global_signal" in name


def input_design(table: dict[str, np.ndarray] | None, denoising: str, source: str) -> np.ndarray:
    """The centred regressors (frames, k) that ``prepare`` removes from every voxel of a run for
    ``denoising`` (see ``denoising_name``). Frames a strategy drops (non-steady state) get one regressor
    each, which sets them to the voxel's mean: the run keeps its length, so windows stay contiguous."""
    strategy, global_signal = parse_denoising(denoising)
    if table is None:
        raise InputError(f"{source}: no confounds table for --confounds {denoising} (fMRIPrep's "
                         "desc-confounds_timeseries.tsv beside the run, or a confounds column in the manifest)")
    design, keep = nuisance_design(table, strategy, global_signal=global_signal, source=source)
    dropped = np.flatnonzero(~keep)
    one_hot = np.zeros((len(keep), len(dropped)))
    one_hot[dropped, np.arange(len(dropped))] = 1.0
    design = np.column_stack([design, one_hot])
    design = design - design.mean(0)
    return design[:, design.std(0) > 1e-12]  # a constant column is the intercept's, which the mean keeps


def denoise(series: np.ndarray, design: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The kept frames of ``series`` (frames, parcels) less their least-squares fit by ``design`` and
    an intercept, fitted on the kept frames only (censored frames do not shape the fit)."""
    y = series[keep]
    x = np.column_stack([np.ones(len(y)), design[keep]])
    x[:, 1:] -= x[:, 1:].mean(0)
    coefficients, *_ = np.linalg.lstsq(x, y, rcond=None)
    return y - x @ coefficients


def participant_motion(store) -> dict[str, float]:
    """Participant -> mean framewise displacement over their prepared runs, where the store's manifest
    has it (runs prepared with their confounds)."""
    per_participant: dict[str, list[float]] = {}
    for row in store.manifest:
        if row.get("status") == "ok" and row.get("mean_fd") not in (None, ""):
            per_participant.setdefault(store.unit(row), []).append(float(row["mean_fd"]))
    return {p: round(float(np.mean(v)), 4) for p, v in per_participant.items()}


def non_steady_report(store) -> str | None:
    """One line for the end of ``prepare`` where runs' leading non-steady-state frames were left out."""
    rows = [r for r in store.manifest if r.get("status") in ("ok", "excluded")]
    dropped = [int(r.get("non_steady_state_dropped") or 0) for r in rows]
    if not any(dropped):
        return None
    fewest, most = min(d for d in dropped if d), max(dropped)
    return (f"leading non-steady-state frames dropped from {sum(d > 0 for d in dropped)} of {len(rows)} run(s) "
            f"({fewest}{f'-{most}' if most > fewest else ''} each; non_steady_state_dropped in manifest.tsv)")


HIGH_MOTION_MM = 0.5  # a run whose mean framewise displacement is above this is named in prepare's summary


def motion_report(store) -> str | None:
    """One line on the store's head motion, for the end of ``prepare``: the median of the runs' mean
    framewise displacement and the runs above ``HIGH_MOTION_MM`` (often excluded from analyses)."""
    rows = [r for r in store.manifest if r.get("status") in ("ok", "excluded") and r.get("mean_fd") not in (None, "")]
    if not rows:
        return None
    means = np.array([float(r["mean_fd"]) for r in rows])
    high = [r["run_id"] for r, m in zip(rows, means) if m > HIGH_MOTION_MM]
    line = (f"head motion of {len(rows)} run(s): median mean framewise displacement {np.median(means):.3f} mm; "
            f"{len(high)} above {HIGH_MOTION_MM} mm")
    if high:
        line += f" ({', '.join(high[:5])}{', ...' if len(high) > 5 else ''}; mean_fd in manifest.tsv)"
    excluded = sum(r["status"] == "excluded" for r in rows)
    if "max_mean_fd" in store.info:
        line += f"; {excluded} excluded above --max_mean_fd {store.info['max_mean_fd']} mm (status in manifest.tsv)"
    return line
