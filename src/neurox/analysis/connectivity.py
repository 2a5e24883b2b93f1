"""Functional connectivity from a store: parcel time series and correlation matrices.

An atlas (any 3D label NIfTI in MNI space, e.g. the synthetic cohort's parcels or Schaefer) is
resampled (nearest neighbour) onto the store's grid through the world coordinates of both; each
parcel's series is the mean over its in-brain voxels, frame by frame.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from neurox.analysis.edges import network_blocks, pair_statistics
from neurox.analysis.matrix_table import MatrixTable
from neurox.analysis.nbs import NBSOptions
from neurox.data.confounds import Denoising, participant_motion
from neurox.data.loader import prepared_runs
from neurox.data.store import Store
from neurox.io.atomic import write_atomic, write_text_atomic
from neurox.io.claim import claim_folder, resolved
from neurox.io.nifti import InputError, read_volume_ras
from neurox.io.npz import npz_writer, save_npy


def atlas_on_grid(atlas_path: str | Path, grid_shape, grid_affine: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Atlas labels on the store grid (0 = none) and the labels present."""
    labels, info = read_volume_ras(atlas_path)
    source_affine = info.ras_affine
    index = np.indices(grid_shape).reshape(3, -1)
    world = grid_affine[:3, :3] @ index + grid_affine[:3, 3:4]
    source = np.linalg.inv(source_affine)[:3, :3] @ world + np.linalg.inv(source_affine)[:3, 3:4]
    source = np.round(source).astype(int)
    inside = np.all((source >= 0) & (source < np.array(labels.shape)[:, None]), axis=0)
    out = np.zeros(index.shape[1], dtype=np.int32)
    out[inside] = labels[tuple(source[:, inside])]
    out = out.reshape(grid_shape)
    present = sorted(int(v) for v in np.unique(out) if v != 0)
    if not present:
        raise ValueError(f"{atlas_path}: no atlas label falls on the store grid (is the atlas in MNI space?)")
    return out, present


def label_index(atlas: np.ndarray, labels: list[int]) -> np.ndarray:
    """Each voxel's parcel as 1 + its position in ``labels`` (0: in none), flat: the bins of ``np.bincount``."""
    lookup = np.zeros(max(int(atlas.max()), max(labels, default=0)) + 1, dtype=np.int64)
    lookup[labels] = np.arange(1, len(labels) + 1)
    return lookup[atlas.ravel()]


def parcel_series(store: Store, run_id: str, atlas: np.ndarray, labels: list[int], block: int = 64) -> np.ndarray:
    """(frames, parcels) mean signal of each parcel's in-brain voxels."""
    reader = store.run(run_id)
    column = label_index(np.where(store.mask(run_id), atlas, 0), labels)
    voxels = np.flatnonzero(column)  # only voxels in a parcel are summed: a fraction of the grid
    column = column[voxels] - 1
    counts = np.bincount(column, minlength=len(labels)).astype(np.float64)
    series = np.zeros((reader.n_frames, len(labels)))
    for start in range(0, reader.n_frames, block):
        n = min(block, reader.n_frames - start)
        frames = reader.read(start, n).reshape(n, -1)[:, voxels]
        for i in range(n):  # bincount sums in float64
            series[start + i] = np.bincount(column, weights=frames[i], minlength=len(labels))
    with np.errstate(invalid="ignore", divide="ignore"):
        return series / counts


KINDS = ("fisher_z", "plain", "partial", "tangent")  # what a participant's connectivity matrix is


def correlation_matrix(series: np.ndarray, kind: str = "fisher_z") -> np.ndarray:
    """Pearson correlation between parcels (``plain``), its Fisher z (``fisher_z``), the partial
    correlation from the precision matrix (``partial``), or the shrunk correlation that the tangent space
    starts from (``tangent``: neurox.analysis.tangent, which needs the group's matrices to go further)."""
    if kind == "tangent":
        from neurox.analysis.tangent import shrunk_correlation

        return shrunk_correlation(series)
    series = series - series.mean(0)
    std = series.std(0)
    std[std == 0] = 1.0
    z = series / std
    corr = z.T @ z / len(z)
    if kind == "partial":
        precision = np.linalg.pinv(corr)
        d = np.sqrt(np.abs(np.diag(precision)))
        d[d == 0] = 1.0
        corr = -precision / np.outer(d, d)
    np.fill_diagonal(corr, 1.0)
    if kind == "fisher_z":
        corr = np.arctanh(np.clip(corr, -0.999999, 0.999999))
        np.fill_diagonal(corr, 0.0)
    elif kind not in ("plain", "partial"):
        raise ValueError(f"unknown connectivity kind {kind!r}; choose {', '.join(KINDS)}")
    return corr


def store_atlas(store: Store, atlas_path: str | Path) -> tuple[np.ndarray, list[int]]:
    """The atlas on the store's grid (every run of a store shares one grid and affine)."""
    grid = tuple(store.info["grid"])
    affine = np.array(store.run(store.run_ids[0]).attributes["affine"])
    return atlas_on_grid(atlas_path, grid, affine)


def participant_matrices(store: Store, atlas: np.ndarray, labels: list[int], runs: dict[str, list[str]],
                         kind: str = "fisher_z", progress: bool = True, denoising: Denoising | None = None,
                         cache: Path | None = None, on_series=None,
                         workers: int = 1) -> Iterator[tuple[str, np.ndarray]]:
    """(participant, connectivity matrix), one participant at a time in sorted order: the mean over the
    participant's ``runs`` (in Fisher-z space when ``kind`` is fisher_z), from each run's series denoised as
    ``denoising`` says. ``on_series(run_id, series)``, when given, receives each run's (frames, parcels)
    series, denoised, float32. A run that cannot be read, or whose confounds cannot denoise it, is reported on
    one line and left out; the others go on. ``cache``, a folder: each run's parcel series is kept there as it
    is computed and read from there when present, so an interrupted run resumes where it stopped (the series
    are exact: float64). ``workers`` > 1: participants are computed in that many processes (reading and
    averaging a run's frames is most of the time), and still come out in order."""
    import sys

    from neurox.progress import progress as progress_display
    from neurox.workers import process_pool

    order = sorted(runs)
    setting = (atlas, labels, kind, denoising, cache, on_series is not None)
    pool = process_pool(min(workers, len(order)), _start_worker, (store.root, *setting)) \
        if workers > 1 and len(order) > 1 else None
    with pool or contextlib.nullcontext():  # the pool, on an error or Ctrl-C, drops what is queued
        results = pool.map(_worker_participant, [runs[p] for p in order]) if pool \
            else (participant_runs(store, runs[p], *setting) for p in order)
        # the display wraps the pairs, so that it sees their end and closes (zip stops on ``order`` first)
        for p, (series, matrix, problems) in progress_display(zip(order, results), total=len(order),
                                                              desc="connectivity", unit="participant",
                                                              disable=not progress):
            for problem in problems:
                print(f"neurox: {problem}; left out", file=sys.stderr)
            for run_id, run_series in series:
                on_series(run_id, run_series)
            if matrix is not None:
                yield p, matrix


def participant_runs(store: Store, run_ids: list[str], atlas: np.ndarray, labels: list[int], kind: str,
                     denoising: Denoising | None, cache: Path | None, keep_series: bool):
    """One participant: its runs' denoised series (float32, when ``keep_series``), the mean of their matrices
    (None when no run could be used), and why each run left out was."""
    series_out, matrices, problems = [], [], []
    for run_id in run_ids:
        cached = cache / f"{run_id}.npy" if cache is not None else None
        try:
            if cached is not None and cached.is_file():
                series = np.load(cached)
            else:
                series = np.nan_to_num(parcel_series(store, run_id, atlas, labels))
                if cached is not None:
                    save_npy(cached, series)
        except (OSError, ValueError, KeyError) as err:
            problems.append(f"{store.root / run_id}: cannot read the run ({err})")
            continue
        if denoising is not None and denoising.active:
            try:
                series = denoising.apply(series, store.run(run_id).confounds(), f"run {run_id}")
            except InputError as err:
                problems.append(str(err))
                continue
        if keep_series:
            series_out.append((run_id, series.astype(np.float32)))
        matrices.append(correlation_matrix(series, kind))
    return series_out, (np.mean(matrices, axis=0) if matrices else None), problems


_WORKER: dict = {}  # a worker process's store and settings, set once by _start_worker


def _start_worker(root: Path, *setting) -> None:
    _WORKER.update(store=Store(root), setting=setting)


def _worker_participant(run_ids: list[str]):
    return participant_runs(_WORKER["store"], run_ids, *_WORKER["setting"])


def series_cache(out: str | Path, atlas_grid: np.ndarray) -> Path:
    """Where a command writing to ``out`` keeps each run's parcel series, so that an interrupted run resumes:
    a folder named by the atlas on the store grid (``store_atlas``; another atlas never reads it), removed by
    the command once its outputs are written."""
    cache = Path(out) / f".series-{hashlib.sha256(atlas_grid.tobytes()).hexdigest()[:12]}"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(matrix.shape[0], k=1)
    return matrix[i, j]


# --- the `neurox connectivity` command ---------------------------------------------------------


def names_table(atlas_path: str | Path, names_tsv: str | Path | None = None) -> dict[int, dict[str, str]]:
    """Label -> row of the parcel names TSV (``index``, ``name``, optional ``network``): the one given, else one
    beside the atlas with its name (``X.nii.gz`` -> ``X.tsv``) or its BIDS stem without space/res entities
    (``atlas-A_space-MNI_res-2_dseg.nii.gz`` -> ``atlas-A_dseg.tsv``); empty when there is none."""
    from neurox.data.store import read_tsv

    atlas_path = Path(atlas_path)
    stem = atlas_path.name.removesuffix(".gz").removesuffix(".nii")
    bids_stem = "_".join(part for part in stem.split("_") if not part.startswith(("space-", "res-", "den-")))
    candidates = [Path(names_tsv)] if names_tsv else [atlas_path.with_name(stem + ".tsv"),
                                                      atlas_path.with_name(bids_stem + ".tsv")]
    for path in candidates:
        rows = read_tsv(path)
        if rows and {"index", "name"} <= set(rows[0]):
            return {int(float(r["index"])): r for r in rows}
        if names_tsv:
            raise ValueError(f"{path}: a parcel names table needs 'index' and 'name' columns")
    return {}


def atlas_names(atlas_path: str | Path, labels: list[int], names_tsv: str | Path | None = None) -> list[str]:
    """Parcel names from the names table (``names_table``), else the label numbers."""
    table = names_table(atlas_path, names_tsv)
    return [table[label]["name"] if label in table else str(label) for label in labels]


MAX_GROUPS = 10  # a --group_by column with more values gets no per-value mean matrices (a slope is tested)
SCHAEFER_NAME = re.compile(r"^\d+Networks_(?:LH|RH)_([A-Za-z]+)")  # 7Networks_LH_Vis_1 -> Vis


def atlas_networks(atlas_path: str | Path, labels: list[int], names_tsv: str | Path | None = None) -> list[str] | None:
    """Each parcel's network: the names table's ``network`` column, else what Schaefer-style names say; None
    when neither gives every parcel one."""
    table = names_table(atlas_path, names_tsv)
    rows = [table.get(label, {}) for label in labels]
    networks = [row.get("network") or "" for row in rows]
    if not all(networks):
        matches = [SCHAEFER_NAME.match(row.get("name", "")) for row in rows]
        networks = [m.group(1) if m else "" for m in matches]
    return networks if all(networks) and len(set(networks)) > 1 else None


def square(values: np.ndarray, pairs: list[tuple[int, int]], size: int) -> np.ndarray:
    """A symmetric (size, size) matrix from one value per (a, b) pair (0 where no pair gives one)."""
    matrix = np.zeros((size, size), dtype=np.float32)
    if pairs:
        a, b = np.array(pairs).T
        matrix[a, b] = matrix[b, a] = values
    return matrix


def connectivity(store_path: str | Path, atlas: str | Path, out: str | Path, kind: str = "fisher_z",
                 participants: list[str] | None = None, group_by: str | None = None,
                 names_tsv: str | Path | None = None, progress: bool = True,
                 denoising: Denoising | None = None, covariates: list[str] | None = None, workers: int = 1,
                 harmonize: str | None = None, nbs: NBSOptions | None = None) -> Path:
    """Parcel series per run and a connectivity matrix per participant, written to ``out``:

    - ``connectivity.npz``: ``matrices`` (participants, parcels, parcels), ``participants``, ``labels``,
      ``names``, ``kind``, ``denoising`` (JSON), ``group_mean`` (and ``group_mean_<value>`` per value of
      ``group_by``), and with ``kind`` tangent the ``tangent_reference`` (the participants' geometric mean);
    - ``parcel_series.npz``: one (frames, parcels) array per run id (denoised, scrubbed frames dropped), with
      ``labels``;
    - ``participants.tsv`` (the store's phenotypes of the participants included, and their ``mean_fd``
      where the store has it), ``parcels.tsv``;
    - ``group_mean.png``: the group-mean matrix (one panel per group and their difference with ``group_by``);
    - with ``group_by``: ``edges.tsv`` (every edge's effect, t, p and FDR q, adjusted for ``covariates``;
      neurox.analysis.edges) and ``edges.json`` (the test and its summary), ``edge_t``/``edge_q`` in the npz;
      with ``harmonize`` (a site or scanner column) the edges are harmonised by ComBat first, the group and
      covariates preserved (neurox.analysis.harmonize; the matrices written stay as computed); with ``nbs``, the
      network-based statistic's components (``nbs.tsv``, ``nbs_components`` in the npz; neurox.analysis.nbs);
    - where the atlas' parcels have networks (``atlas_networks``): ``networks.tsv`` (each participant's mean
      within and between networks), ``network_matrices``/``network_names`` in the npz and, with ``group_by``,
      ``network_edges.tsv``.
    """

    from neurox.data.store import write_tsv

    if kind not in KINDS:
        raise ValueError(f"unknown connectivity kind {kind!r}; choose {', '.join(KINDS)}")
    store = Store(store_path)
    if not Path(atlas).is_file():
        raise FileNotFoundError(f"{atlas}: no such atlas file")
    phenotypes = {row["participant_id"]: row for row in store.phenotypes()}
    if group_by and phenotypes and group_by not in next(iter(phenotypes.values())):
        raise ValueError(f"{store.root / 'participants.tsv'} has no column {group_by!r} to group by")
    if group_by and not phenotypes:
        raise ValueError(f"{store.root}: no participants.tsv, so nothing to group by")
    motion = participant_motion(store)
    known = set(next(iter(phenotypes.values()), {})) | ({"mean_fd"} if motion else set())
    for name in covariates or []:
        if name not in known:
            raise ValueError(f"--covariates {name}: not a column of {store.root / 'participants.tsv'}"
                             + ("" if motion else " (and the store has no head motion for mean_fd)"))
    if covariates and not group_by:
        raise ValueError("--covariates: give --group_by, the effect they are adjusted for")
    if harmonize and not group_by:
        raise ValueError("--harmonize: give --group_by; the edgewise statistics are what it harmonises for")
    if harmonize and harmonize not in known:
        raise ValueError(f"--harmonize {harmonize}: not a column of {store.root / 'participants.tsv'}")
    if harmonize and (harmonize in (covariates or []) or harmonize == group_by):
        raise ValueError(f"--harmonize {harmonize}: ComBat removes the effect of {harmonize}; it cannot also be "
                         + ("a covariate" if harmonize != group_by else "the effect tested"))
    if nbs and not group_by:
        raise ValueError("--nbs: give --group_by, the effect whose edges it tests")
    if nbs and (nbs.threshold <= 0 or nbs.permutations < 1):
        raise ValueError(f"--nbs {nbs.threshold} --permutations {nbs.permutations}: the threshold is a t above 0 "
                         "(3 to 3.5 are usual) and at least one permutation is needed (1000 or more for p-values)")
    if participants:
        participants, unknown = store.units_of(participants, list(prepared_runs(store)[0]))
        if unknown:
            raise ValueError(f"{store.root}: no prepared runs for participant(s) {', '.join(unknown[:5])}")
    out = Path(out)
    atlas_grid, labels = store_atlas(store, atlas)
    claim_folder(out, "connectivity", {"store": resolved(store.root), "atlas": resolved(atlas),
                                       "names": resolved(names_tsv), "kind": kind,
                                       "participants": sorted(participants) if participants else None,
                                       "denoising": dataclasses.asdict(denoising or Denoising()),
                                       "group_by": group_by, "covariates": covariates or [],
                                       **({"harmonize": harmonize} if harmonize else {}),
                                       **({"nbs": dataclasses.asdict(nbs)} if nbs else {})})
    cache = series_cache(out, atlas_grid)
    runs, _ = prepared_runs(store, participants)
    names, networks = atlas_names(atlas, labels, names_tsv), atlas_networks(atlas, labels, names_tsv)
    size = len(labels)
    value = {p: phenotypes.get(p, {}).get(group_by, "") for p in runs} if group_by else {}
    distinct = sorted(set(value.values()) - {"", "n/a"})
    sums = {v: np.zeros((size, size)) for v in distinct} if len(distinct) <= MAX_GROUPS else {}  # else a slope
    counts = dict.fromkeys(sums, 0)
    i, j = np.triu_indices(size, k=1)
    # One participant's matrix in memory at a time: every matrix goes to a table on disk, which the edgewise
    # tests read in slices of edges and connectivity.npz is written from.
    table, subjects = MatrixTable(cache / "matrices", size), []
    with npz_writer(out / "parcel_series.npz") as series_npz, table.appending() as append:
        for p, matrix in participant_matrices(store, atlas_grid, labels, runs, kind, progress, denoising, cache,
                                              on_series=series_npz.add, workers=workers):
            append(matrix)
            subjects.append(p)
        if not subjects:
            raise ValueError(f"{store.root}: no participant's runs could be read")
        series_npz.add("labels", np.array(labels))
    arrays = {"participants": np.array(subjects), "labels": np.array(labels), "names": np.array(names),
              "kind": np.array(kind), "denoising": np.array(json.dumps(dataclasses.asdict(denoising or Denoising())))}
    if kind == "tangent":  # each matrix as its deviation from the group's geometric mean (neurox.analysis.tangent)
        from neurox.analysis.tangent import tangent_table

        reference = tangent_table(table, workers=workers, progress=progress)
        arrays["tangent_reference"] = reference.astype(np.float32)

    n, total, block_rows = len(subjects), np.zeros((size, size)), []
    for p, matrix in zip(subjects, table):
        total += matrix
        if value.get(p) in sums:
            sums[value[p]] += matrix
            counts[value[p]] += 1
        if networks:  # the participant's mean connectivity within and between the atlas' networks
            row, pairs, network_names = network_blocks(matrix[None], networks)
            block_rows.append(row[0])
    mean = (total / n).astype(np.float32)
    groups = {v: (sums[v] / counts[v]).astype(np.float32) for v in sums if counts[v]}
    arrays.update({"group_mean": mean, **{f"group_mean_{v}": matrix for v, matrix in groups.items()}})

    if networks:
        blocks = np.array(block_rows)
        arrays["network_names"] = np.array(network_names)
        arrays["network_matrices"] = np.stack([square(b, pairs, len(network_names)) for b in blocks])
        write_tsv(out / "networks.tsv", [{"participant_id": p, **{f"{network_names[a]}-{network_names[b]}":
                                                                   f"{v:.6g}" for (a, b), v in zip(pairs, row)}}
                                         for p, row in zip(subjects, blocks)],
                  ["participant_id", *[f"{network_names[a]}-{network_names[b]}" for a, b in pairs]])
    if group_by:
        known = {p: dict(phenotypes.get(p, {}), mean_fd=motion.get(p, "")) for p in subjects}
        test = {"values": [known[p].get(group_by, "") for p in subjects], "subjects": subjects,
                "covariates": {c: [str(known[p].get(c, "")) for p in subjects] for c in covariates or []},
                "harmonize": (harmonize, [str(known[p].get(harmonize, "")) for p in subjects]) if harmonize else None}
        summary, per_edge = pair_statistics(table.edge_columns, [(names[a], names[b]) for a, b in zip(i, j)],
                                            out / "edges.tsv", nbs=nbs, progress=progress and nbs is not None,
                                            **test)
        if per_edge:
            arrays["edge_t"], arrays["edge_q"] = (square(per_edge[k], list(zip(i, j)), size) for k in "tq")
        if per_edge and nbs:
            summary["nbs"], arrays["nbs_components"] = write_nbs(out / "nbs.tsv", per_edge, nbs, i, j, names,
                                                                 networks)
        if networks:
            summary["networks"], _ = pair_statistics(
                lambda lo, hi: blocks[:, lo:hi], [(network_names[a], network_names[b]) for a, b in pairs],
                out / "network_edges.tsv", columns=("network_a", "network_b"), **test)
        write_text_atomic(out / "edges.json", json.dumps({"group_by": group_by, **summary}, indent=2) + "\n")

    with npz_writer(out / "connectivity.npz") as npz:
        npz.add_rows("matrices", (n, size, size), np.float32, iter(table))
        for name, array in arrays.items():
            npz.add(name, array)
    write_tsv(out / "parcels.tsv", [{"index": i, "label": label, "name": name}
                                    for i, (label, name) in enumerate(zip(labels, names))], ["index", "label", "name"])
    columns = ["participant_id"] + [c for c in next(iter(phenotypes.values()), {}) if c != "participant_id"]
    rows = [dict(phenotypes.get(p, {"participant_id": p})) for p in subjects]
    if motion:  # beside the phenotypes: how much each participant moved, to check what FC differences follow
        columns.append("mean_fd")
        for row in rows:
            row["mean_fd"] = motion.get(row["participant_id"], "")
    write_tsv(out / "participants.tsv", rows, columns)
    plot_matrices(out / "group_mean.png", mean, groups, names, kind, group_by, arrays.get("edge_t"))
    shutil.rmtree(cache, ignore_errors=True)
    return out


def write_nbs(tsv: Path, per_edge: dict, nbs: NBSOptions, i: np.ndarray, j: np.ndarray, names: list[str],
              networks: list[str] | None = None):
    """The network-based statistic's components in ``tsv`` (each one's sign, edges, parcels by degree, family-wise
    p and, where parcels have networks, its edges per pair of networks); returns the summary for edges.json and each
    edge's component as a (parcels, parcels) matrix."""
    from neurox.analysis.nbs import ALPHA, network_based_statistic
    from neurox.data.store import write_tsv

    found, edge_component, null = network_based_statistic(per_edge["t"], per_edge.pop("null_signs"), nbs.threshold,
                                                          i, j, len(names))
    rows = []
    for component in found:
        members = edge_component == component["component"]
        degree = np.bincount(np.concatenate([i[members], j[members]]), minlength=len(names))
        hubs = np.argsort(-degree, kind="stable")[: len(component["parcels"])]
        rows.append({"component": component["component"], "sign": component["sign"], "edges": component["edges"],
                     "parcels": len(component["parcels"]), "p_fwe": f"{component['p_fwe']:.4g}",
                     "parcels_by_degree": ", ".join(f"{names[h]} ({degree[h]})" for h in hubs)})
        if networks:  # where the component lies: its edges within and between networks, most first
            pairs = Counter(tuple(sorted((networks[a], networks[b]))) for a, b in zip(i[members], j[members]))
            counts = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))
            rows[-1]["network_pairs"] = ", ".join(f"{a}-{b} ({count})" for (a, b), count in counts)
    write_tsv(tsv, rows, ["component", "sign", "edges", "parcels", "p_fwe", "parcels_by_degree",
                          *(["network_pairs"] if networks else [])])
    summary = {**dataclasses.asdict(nbs), "null_largest_95": float(np.quantile(null, 0.95)),
               "alpha": ALPHA, "significant": sum(c["p_fwe"] < ALPHA for c in found),
               "components": [{**{k: v for k, v in c.items() if k != "parcels"}, "parcels": len(c["parcels"])}
                              for c in found[:10]]}
    return summary, square(edge_component.astype(np.float32), list(zip(i, j)), len(names)).astype(np.int32)


def plot_matrices(png: Path, mean: np.ndarray, groups: dict[str, np.ndarray], names: list[str], kind: str,
                  group_by: str | None, edge_t: np.ndarray | None = None) -> Path | None:
    """The group-mean matrix, or with groups one panel per group and the difference of the last two; and the
    edgewise t of ``group_by`` where it was tested."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    panels = [("group mean", mean)]
    if len(groups) >= 2:
        panels = [(f"{group_by} = {value}", matrix) for value, matrix in groups.items()]
        (a, ma), (b, mb) = list(groups.items())[-2:]
        panels.append((f"{b} - {a}", mb - ma))
    if edge_t is not None:
        panels.append((f"t, {group_by}", edge_t))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], panels):
        limit = float(np.abs(matrix).max()) or 1.0
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(title, fontsize=9)
        if len(names) <= 50:
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=4)
            ax.set_yticks(range(len(names)), names, fontsize=4)
        fig.colorbar(image, ax=ax, fraction=0.046, label="t" if title.startswith("t, ") else kind.replace("_", "-"))
    fig.tight_layout()
    write_atomic(png, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return png
