"""``neurox prepare --dry_run``: what a prepare would find and do, from the runs' headers alone.

Before hours of preparing a cohort, one pass over the NIfTI headers (a few milliseconds a run) says what
would go wrong: runs that are not 4D or too short, TRs and grids that differ between sites, grids that do
not align with the target box (refused without ``--resample``), runs without a brain mask or confounds, and
runs the chosen denoising cannot be applied to. Nothing is written.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from neurox.data.confounds import leading_non_steady, table_columns
from neurox.data.grid import GridMapping
from neurox.data.preprocess import (
    NON_STEADY_SEARCH,
    PrepareOptions,
    computable_confounds,
    has_markers,
    run_design,
    run_tr,
)
from neurox.data.temporal import TR_TOLERANCE, output_frames
from neurox.io.bids import RunSpec
from neurox.io.nifti import InputError, read_info
from neurox.progress import progress as progress_display

NAMED = 3  # runs named per problem; the rest are counted


def survey(specs: list[RunSpec], options: PrepareOptions, is_done, progress: bool = True) -> list[str]:
    """Lines describing what preparing ``specs`` with ``options`` would do; ``is_done(spec)`` says whether
    the store already holds a run."""
    problems: dict[str, list[str]] = {}
    frames, trs, grids, non_steady = Counter(), Counter(), Counter(), Counter()
    known_trs, from_frames = [], 0
    todo = [spec for spec in specs if not is_done(spec)]
    for spec in progress_display(todo, desc="dry run", unit="run", disable=not progress):
        try:
            info = read_info(spec.bold)
        except InputError as err:
            problems.setdefault("unreadable", []).append(str(err))
            continue
        if len(info.shape) < 4:
            problems.setdefault("not 4D", []).append(spec.run_id)
            continue
        frames[info.n_frames] += 1
        try:
            tr = run_tr(spec, info, options.tr)
        except InputError as err:
            problems.setdefault("no TR in seconds", []).append(str(err))
            tr = None
        trs["unknown (give --tr)" if tr is None else f"{tr:g} s"] += 1
        if tr is not None:
            known_trs.append(tr)
        n_frames = info.n_frames  # as stored: after its leading non-steady-state frames and resampling in time
        if options.non_steady_state == "drop" and not has_markers(spec):
            from_frames += 1
        elif options.non_steady_state == "drop":
            try:
                leading = leading_non_steady(spec.confounds)
            except InputError as err:
                problems.setdefault("unreadable confounds table", []).append(str(err))
                leading = 0
            non_steady[leading] += 1
            n_frames -= leading
        if options.resample_tr is not None and tr is None:
            problems.setdefault("no TR to resample from (give --tr)", []).append(spec.run_id)
        elif options.resample_tr is not None:
            n_frames = output_frames(n_frames, tr, options.resample_tr)
        if n_frames < options.min_frames:
            problems.setdefault(f"fewer than --min_frames {options.min_frames} frames"
                                + (f" at TR {options.resample_tr:g} s" if options.resample_tr else ""),
                                []).append(spec.run_id)
        zooms = "x".join(f"{z:g}" for z in np.sqrt((info.ras_affine[:3, :3] ** 2).sum(0)))
        try:
            mapping = GridMapping(info, options.grid, resample=False)
            grids[f"{zooms} mm, " + ("aligned with the target box" if mapping.aligned else
                                     f"averaged onto the {options.grid.voxel_size_mm:g} mm target box")] += 1
        except InputError:
            grids[f"{zooms} mm, not aligned: " + ("resampled" if options.resample else "refused without --resample")
                  ] += 1
        if options.denoising != "none":
            reason = _denoising_problem(spec, options.denoising, info.n_frames, tr or 1.0)
            if reason:
                problems.setdefault(reason, []).append(spec.run_id)

    lines = [f"dry run (nothing written): {len(todo)} run(s) to prepare, {len(specs) - len(todo)} already in the store"]
    if todo:
        lines.append(f"{_count(todo, lambda s: s.mask is not None)} with a brain mask (else computed), "
                     f"{_count(todo, lambda s: s.confounds is not None)} with a confounds table, "
                     f"{_count(todo, lambda s: s.segmentation is not None)} with FreeSurfer labels (HCP wmparc)")
        lines.append("frames: " + _tally(frames, "{}"))
        if sum(n for leading, n in non_steady.items() if leading) or from_frames:
            lines.append("leading non-steady-state frames dropped: " + "; ".join(
                ([_tally(non_steady, "{} frame(s)")] if non_steady else [])
                + ([f"found in their first {NON_STEADY_SEARCH} frames when prepared ({from_frames} run(s) without "
                    "fMRIPrep's markers)"] if from_frames else [])))
        lines.append("TR: " + _tally(trs, "{}") + (f"; every run resampled to {options.resample_tr:g} s"
                                                   if options.resample_tr else ""))
        if not options.resample_tr and known_trs and max(known_trs) / min(known_trs) - 1 > TR_TOLERANCE:
            lines.append(f"TRs differ by more than {TR_TOLERANCE:.0%}: a window of so many frames would span "
                         f"{max(known_trs) / min(known_trs):.1f} times as long in some runs as in others; "
                         "--resample_tr SECONDS gives every run one TR")
        lines.append("grid: " + _tally(grids, "{}"))
    for problem, runs in problems.items():
        named = ", ".join(runs[:NAMED]) + (f", ... ({len(runs)} in all)" if len(runs) > NAMED else "")
        lines.append(f"would fail, {problem}: {named}")
    return lines


def _denoising_problem(spec: RunSpec, denoising: str, n_frames: int, tr: float) -> str | None:
    """Why ``denoising`` could not be applied to a run, from its confounds table's columns; None if it could."""
    if spec.confounds is None:
        return f"no confounds table for --confounds {denoising}"
    try:
        table = table_columns(spec.confounds)
    except InputError as err:
        return str(err).split(": ", 1)[-1]
    columns = table | set(computable_confounds(spec, table, n_frames, tr))
    if "a_comp_cor" in columns:
        columns |= {f"a_comp_cor_0{i}" for i in range(5)}
    if "cosine" in columns:
        columns.add("cosine00")
    try:
        run_design({c: np.zeros(n_frames) for c in columns}, denoising, str(spec.confounds), spec)
    except InputError as err:
        return str(err).split(": ", 1)[-1]
    return None


def _count(specs: list[RunSpec], test) -> int:
    return sum(1 for s in specs if test(s))


def _tally(counter: Counter, label: str) -> str:
    return "; ".join(f"{label.format(key)} ({n} run(s))" for key, n in counter.most_common())

