"""``neurox explain``: which voxels drove a trained model's output, as NIfTI maps.

Integrated Gradients (captum) of one output of the model, optionally under a SmoothGrad-squared
noise tunnel, over every non-overlapping window of each chosen participant. Each window's
attribution ``(C, X, Y, Z, T)`` is reduced to a 3D map (absolute values summed over channels and
time by default: a voxel whose fluctuations matter counts whatever their sign at each frame),
then averaged over the participant's windows. The map is taken back from the model grid to the
store grid (the inverse of the centre crop or pad of the loader), and from the store grid onto
the participant's original image grid through the original affine (orientation and crop box
honoured). Group maps, the mean over participants of a class or quantile, and contrast maps,
the difference between groups (where an effect lies), are in the store's MNI grid, with a
glass-brain PNG.

Outputs in ``--out``: ``<participant>_attribution.nii.gz`` (the original grid),
``<participant>_space-store_attribution.nii.gz`` (the store's MNI grid), ``group-<name>_attribution.nii.gz``
and ``.png`` (groups and contrasts), ``explain.json`` (what was computed). A participant whose maps exist is not
recomputed, so an interrupted run resumes. With an atlas, the regions that drove the output:
``regions.tsv`` (per group and contrast map, each region's mean attribution, its share of the map's total and
its rank; unsmoothed maps, the region's voxels being the average) and ``participant_regions.tsv`` (one row per
participant, one column per region).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from neurox.analysis.connectivity import label_index
from neurox.data.loader import matching, prepared_runs, run_windows, window_batches
from neurox.data.store import Store
from neurox.hub import weights_digest
from neurox.io.claim import claim_folder, resolved
from neurox.train.folds import scoring_models

REDUCTIONS = ("abs", "signed")
BASELINES = ("zero", "temporal_mean")


@dataclass
class ExplainOptions:
    target: str | None = None  # the output to explain: a target column of the run (default: its first)
    class_value: str | None = None  # multiclass: the class whose logit to explain (default: the first)
    n_steps: int = 16  # Integrated Gradients path steps
    noise_samples: int = 0  # > 0: SmoothGrad-squared noise tunnel with this many noisy copies
    noise_std: float = 0.1  # noise as a fraction of each window's standard deviation
    baseline: str = "zero"  # zero, or temporal_mean (each voxel's mean over the window: no fluctuation)
    reduce: str = "abs"  # abs or signed sum over channels and time
    batch_size: int = 2  # windows at a time; IG steps are run in chunks of this size too
    smooth_fwhm: float = 6.0  # mm, Gaussian smoothing inside the brain of group and contrast maps (0: none)

    def __post_init__(self):
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"unknown --reduce {self.reduce!r}; choose {' or '.join(REDUCTIONS)}")
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown --baseline {self.baseline!r}; choose {' or '.join(BASELINES)}")
        if self.n_steps < 2 or self.batch_size < 1 or self.noise_samples < 0 or self.smooth_fwhm < 0:
            raise ValueError("--n_steps must be >= 2, --batch_size >= 1, --noise_samples >= 0, --smooth_fwhm >= 0")


# what a participant's map depends on besides the participant: a resumed run must share them to reuse its maps
MAP_OPTIONS = ("target", "class_value", "n_steps", "noise_samples", "noise_std", "baseline", "reduce")


def _captum():
    try:
        import captum.attr
    except ImportError:
        raise ValueError("neurox explain needs captum: pip install 'neurox-lbm[analysis]'") from None
    return captum.attr


def attribute(model: torch.nn.Module, windows: torch.Tensor, output: int, options: ExplainOptions) -> torch.Tensor:
    """Attribution of ``model(windows)[:, output]`` to each input value, same shape as ``windows``
    ``(B, C, X, Y, Z, T)``."""
    attr = _captum()
    baseline = torch.zeros_like(windows) if options.baseline == "zero" else \
        windows.mean(dim=-1, keepdim=True).expand_as(windows).contiguous()
    method = attr.IntegratedGradients(model)
    kwargs = dict(baselines=baseline, target=output, n_steps=options.n_steps,
                  internal_batch_size=options.batch_size)
    if options.noise_samples:
        stdevs = float(options.noise_std * windows.std())
        return attr.NoiseTunnel(method).attribute(windows, nt_type="smoothgrad_sq", nt_samples=options.noise_samples,
                                                  nt_samples_batch_size=1, stdevs=stdevs, **kwargs)
    return method.attribute(windows, **kwargs)


def reduce_window(attribution: torch.Tensor, how: str) -> np.ndarray:
    """(B, C, X, Y, Z, T) -> (B, X, Y, Z): summed over channels and time (of absolute values for abs)."""
    values = attribution.abs() if how == "abs" else attribution
    return values.sum(dim=(1, 5)).detach().cpu().double().numpy()


def to_store_grid(volume: np.ndarray, store_grid) -> np.ndarray:
    """The inverse of the loader's ``fit_to_grid``: a model-grid map back onto the store grid (what
    was cropped off is 0, what was padded is dropped)."""
    out = volume
    for axis, size in enumerate(store_grid):
        have = out.shape[axis]
        if have > size:  # the loader padded: drop the pad
            start = (have - size) // 2
            out = np.take(out, range(start, start + size), axis=axis)
        elif have < size:  # the loader cropped: put back in the middle
            before = (size - have) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, size - have - before)
            out = np.pad(out, pad)
    return out


def to_source_grid(volume: np.ndarray, store_affine: np.ndarray, source_shape, source_affine: np.ndarray) -> np.ndarray:
    """A store-grid map onto a participant's original image grid: each source voxel takes the
    (trilinear; exact where the grids align) value at its world position; outside the store box, 0."""
    from scipy.ndimage import map_coordinates

    index = np.indices(tuple(source_shape[:3]), dtype=np.float64).reshape(3, -1)
    matrix = np.linalg.inv(store_affine) @ np.asarray(source_affine, dtype=np.float64)
    coords = matrix[:3, :3] @ index + matrix[:3, 3:4]
    coords = np.where(np.abs(coords - np.round(coords)) < 1e-6, np.round(coords), coords)
    values = map_coordinates(volume.astype(np.float64), coords, order=1, mode="constant", cval=0.0)
    return values.reshape(tuple(source_shape[:3])).astype(np.float32)


def participant_map(model, store: Store, run_ids: list[str], output: int, options: ExplainOptions,
                    progress=None) -> np.ndarray:
    """The mean over every window of the participant's runs of the reduced attribution, on the store grid."""
    length, grid = model.config.img_size[3], model.config.img_size[:3]
    device = next(model.parameters()).device
    total, count = None, 0
    windows = run_windows(store, run_ids, length)
    for chunk, x in window_batches(store, windows, length, grid, options.batch_size, device):
        maps = reduce_window(attribute(model, x.contiguous(), output, options), options.reduce)
        total = maps.sum(0) if total is None else total + maps.sum(0)
        count += len(chunk)
        if progress is not None:
            progress.update(len(chunk))
    return to_store_grid(total / count, tuple(store.info["grid"]))


def outside_brain_share(volume: np.ndarray, brain: np.ndarray) -> float:
    """The fraction of a map's total absolute attribution on voxels outside the brain mask: a model
    that reads the background (a shortcut) shows it here."""
    total = float(np.abs(volume).sum())
    return float(np.abs(volume[~brain]).sum()) / total if total > 0 else 0.0


def smooth_in_brain(volume: np.ndarray, brain: np.ndarray, fwhm_mm: float, voxel_mm: float) -> np.ndarray:
    """Gaussian smoothing that only mixes in-brain voxels (normalised convolution), 0 outside: a
    group map's voxel noise averages out over the extent of a region, as in a group fMRI analysis."""
    if fwhm_mm <= 0:
        return volume
    from scipy.ndimage import gaussian_filter

    sigma = fwhm_mm / voxel_mm / np.sqrt(8 * np.log(2))
    weight = gaussian_filter(brain.astype(np.float64), sigma)
    smoothed = gaussian_filter(np.where(brain, volume, 0.0), sigma) / np.maximum(weight, 1e-6)
    return np.where(brain, smoothed, 0.0)


def save_nifti(path: Path, volume: np.ndarray, affine: np.ndarray) -> None:
    """A float32 .nii.gz written atomically (same bytes for the same map: gzip mtime 0)."""
    import gzip

    import nibabel as nib

    from neurox.io.atomic import write_atomic

    image = nib.Nifti1Image(volume.astype(np.float32), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    data = gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def output_index(targets, options: ExplainOptions) -> tuple[int, str]:
    """Which model output the chosen target (and class) is, and a name for it."""
    names = [t.column for t in targets]
    column = options.target or names[0]
    if column not in names:
        raise ValueError(f"the run predicts {', '.join(names)}, not {column!r}")
    target = targets[names.index(column)]
    if target.task == "multiclass":
        value = options.class_value or target.classes[0]
        if value not in target.classes:
            raise ValueError(f"{column!r} has classes {', '.join(target.classes)}, not {value!r}")
        return target.classes.index(value), f"{column}={value}"
    return names.index(column), column


def choose_participants(store: Store, splits: dict[str, str], subjects: list[str] | None, split: str | None,
                        where: str | None) -> list[str]:
    have, _ = prepared_runs(store)
    chosen = sorted(have)
    if subjects:
        chosen, unknown = store.units_of(subjects, chosen)
        if unknown:
            raise ValueError(f"{store.root}: no prepared runs for participant(s) {', '.join(unknown[:5])}")
    if split:
        chosen = [p for p in chosen if splits.get(p, "external") == split]
    if where:
        chosen = sorted(set(chosen) & matching(store, where))
    if not chosen:
        raise ValueError("no participant matches the selection (--subject / --split / --where)")
    return chosen


def groups_of(store: Store, participants: list[str], column: str | None, quantiles: int) -> dict[str, list[str]]:
    """Group name -> participants: all of them, plus one group per class of ``column`` (or per quantile
    when it is a number with many values)."""
    groups = {"all": list(participants)}
    if not column:
        return groups
    table = {row["participant_id"]: row for row in store.phenotypes()}
    if not table or column not in next(iter(table.values())):
        raise ValueError(f"{store.root / 'participants.tsv'} has no column {column!r} to group by")
    values = {p: table.get(p, {}).get(column, "") for p in participants}
    values = {p: v for p, v in values.items() if v not in ("", "n/a", "NA", "nan")}
    try:
        numbers = {p: float(v) for p, v in values.items()}
    except ValueError:
        numbers = None
    if numbers is not None and len(set(numbers.values())) > 10:
        edges = np.quantile(list(numbers.values()), np.linspace(0, 1, quantiles + 1))
        for q in range(quantiles):
            members = [p for p, v in numbers.items() if edges[q] <= v <= edges[q + 1] and
                       (q == quantiles - 1 or v < edges[q + 1])]
            groups[f"{column}-q{q + 1}of{quantiles}"] = members
    else:
        for value in sorted(set(values.values())):
            groups[f"{column}-{value}"] = [p for p, v in values.items() if v == value]
    return groups


def contrasts_of(groups: dict[str, list[str]], column: str | None) -> dict[str, tuple[list[str], list[str]]]:
    """Contrast name -> (participants whose mean map is added, participants whose mean is subtracted).
    Two classes: the second minus the first; quantiles: the top minus the bottom; more classes: each
    class minus the others. Where an effect lies shows in these, not in a group's mean: attribution is
    large wherever the signal is, in every group, and differs between groups where the effect is."""
    parts = [name for name in groups if name != "all"]
    if len(parts) < 2:
        return {}
    quantiles = re.compile(rf"{re.escape(str(column))}-q\d+of{len(parts)}")  # the names groups_of gives quantiles
    if len(parts) == 2 or all(quantiles.fullmatch(name) for name in parts):
        first, last = parts[0], parts[-1]
        return {f"{last}-minus-{first.removeprefix(f'{column}-')}": (groups[last], groups[first])}
    return {f"{name}-minus-rest": (groups[name], [p for other in parts if other != name for p in groups[other]])
            for name in parts}


class GroupSums:
    """The running sum of the participant maps of each group of participants (a group's, or one side of a
    contrast's): one map per group in memory, whatever the number of participants."""

    def __init__(self, groups: list[list[str]], shape: tuple[int, ...]):
        self.sums = {frozenset(members): np.zeros(shape) for members in groups if members}
        self.counts = dict.fromkeys(self.sums, 0)

    def add(self, participant: str, volume: np.ndarray) -> None:
        for members, total in self.sums.items():
            if participant in members:
                total += volume
                self.counts[members] += 1

    def mean(self, members: list[str]) -> np.ndarray | None:
        """The mean map of the group's participants whose maps were added (None: none was)."""
        key = frozenset(members)
        return self.sums[key] / self.counts[key] if self.counts.get(key) else None


def region_means(volume: np.ndarray, atlas: np.ndarray, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Each atlas region's voxel count and mean value of ``volume`` (both on the store grid)."""
    column = label_index(atlas, labels)
    counts = np.bincount(column, minlength=len(labels) + 1)[1:]
    sums = np.bincount(column, weights=volume.ravel(), minlength=len(labels) + 1)[1:]
    return counts, sums / np.maximum(counts, 1)


def region_rows(name: str, volume: np.ndarray, atlas: np.ndarray, labels: list[int], names: list[str],
                networks: list[str] | None = None) -> list[dict]:
    """``regions.tsv`` rows of one map, highest mean first; ``share`` (of the total over the regions) for maps
    without negative values, where it is the fraction of the attribution the region holds."""
    counts, means = region_means(volume, atlas, labels)
    totals = counts * means
    positive = volume.min() >= 0 and totals.sum() > 0
    order = np.argsort(-means, kind="stable")
    return [{"map": name, "rank": rank, "label": labels[i], "region": names[i],
             **({"network": networks[i]} if networks else {}), "voxels": int(counts[i]),
             "mean_attribution": f"{means[i]:.6g}", "share": f"{totals[i] / totals.sum():.4f}" if positive else ""}
            for rank, i in enumerate(order, start=1)]


def network_rows(region_table: list[dict]) -> list[dict]:
    """``networks.tsv``: the region rows summed per map and network (mean over the network's voxels, share of
    the map's total), highest mean first."""
    sums: dict[tuple[str, str], list[float]] = {}
    for row in region_table:
        entry = sums.setdefault((row["map"], row["network"]), [0.0, 0.0, 0.0, row["share"] != ""])
        entry[0] += row["voxels"]
        entry[1] += row["voxels"] * float(row["mean_attribution"])
        entry[2] += float(row["share"] or 0)
    rows = []
    for name in dict.fromkeys(m for m, _ in sums):
        members = [(network, v) for (m, network), v in sums.items() if m == name]
        members.sort(key=lambda item: -item[1][1] / max(item[1][0], 1))
        rows += [{"map": name, "rank": rank, "network": network, "voxels": int(voxels),
                  "mean_attribution": f"{total / max(voxels, 1):.6g}", "share": f"{share:.4f}" if has_share else ""}
                 for rank, (network, (voxels, total, share, has_share)) in enumerate(members, start=1)]
    return rows


def plot_map(png: Path, volume: np.ndarray, affine: np.ndarray, title: str) -> Path | None:
    """A glass-brain view of a map over the MNI template (nilearn), or nothing without nilearn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import nibabel as nib
        from nilearn import plotting
    except ImportError:
        return None
    from neurox.io.atomic import write_atomic

    image = nib.Nifti1Image(volume.astype(np.float32), affine)
    magnitude = np.abs(volume[volume != 0])  # a contrast map has both signs: threshold on the magnitude
    threshold = float(np.percentile(magnitude, 80)) if magnitude.size else None
    display = plotting.plot_glass_brain(image, threshold=threshold, colorbar=True, title=title,
                                        plot_abs=False, cmap="hot" if volume.min() >= 0 else "RdBu_r")
    write_atomic(png, lambda tmp: display.frame_axes.figure.savefig(tmp, dpi=110, format="png"))
    display.close()
    plt.close("all")
    return png


def explain(run_dir: str | Path, store_path: str | Path, out: str | Path, options: ExplainOptions | None = None,
            subjects: list[str] | None = None, split: str | None = None, where: str | None = None,
            group_by: str | None = None, quantiles: int = 4, device: str = "auto", progress: bool = True,
            atlas: str | Path | None = None, names: str | Path | None = None) -> Path:
    import nibabel as nib

    from neurox.analysis.connectivity import atlas_names, atlas_networks, store_atlas
    from neurox.progress import progress as progress_display
    from neurox.train.distributed import detect

    options = options or ExplainOptions()
    _captum()
    run_dir, out = Path(run_dir), Path(out)
    if out.name.endswith((".nii", ".nii.gz")):  # a folder of that name would pass for a map in a file browser
        raise ValueError(f"--out {out}: explain writes a folder (each participant's map, group maps, explain.json), "
                         f"not one NIfTI file; name a folder, e.g. --out {out.parent / out.name.split('.')[0]}")
    store = Store(store_path)
    targets, splits, models, fold_of = scoring_models(run_dir, store)
    output, output_name = output_index(targets, options)
    participants = choose_participants(store, splits, subjects, split, where)
    if fold_of:  # a cross-validated run explains out of fold alone: the participants some fold tested
        new = [p for p in participants if p not in fold_of]
        participants = [p for p in participants if p in fold_of]
        if new:
            print(f"neurox explain: {len(new)} participants outside the cross-validation of {run_dir} left out "
                  f"(explain them with one fold's run, {run_dir / 'fold1'})", file=sys.stderr)
        if not participants:
            raise ValueError(f"no participant of the cross-validation of {run_dir} matches the selection")
    groups = groups_of(store, participants, group_by, quantiles)
    regions = None  # read before the long part: a wrong atlas fails at once
    if atlas:
        atlas_grid, labels = store_atlas(store, atlas)
        regions = (atlas_grid, labels, atlas_names(atlas, labels, names), atlas_networks(atlas, labels, names))
    for model, _ in models.values():
        model.to(detect(device).device).eval()
        for param in model.parameters():
            param.requires_grad_(False)

    digests = [weights_digest(model.model_dir) for model, _ in models.values()]
    claim_folder(out, "explain", {"model": digests if fold_of else digests[0], "store": resolved(store.root),
                                  **{k: v for k, v in asdict(options).items() if k in MAP_OPTIONS}})
    runs, _ = prepared_runs(store, participants)
    store_affine = np.array(store.run(store.run_ids[0]).attributes["affine"])
    length = next(iter(models.values()))[0].config.img_size[3]
    n_windows = sum(len(run_windows(store, runs[p], length)) for p in participants)
    contrasts = contrasts_of(groups, group_by)
    grid = tuple(store.info["grid"])
    # Group and contrast maps are running sums: memory is one map per group, whatever the number of participants.
    sums = GroupSums([*groups.values(), *[side for pair in contrasts.values() for side in pair]], grid)
    done, failed, shares, participant_regions = [], [], {}, []
    brain = np.zeros(grid, dtype=bool)
    bar = progress_display(total=n_windows, desc="explain", unit="window", disable=not progress)
    for pid in participants:
        common = out / f"{pid}_space-store_attribution.nii.gz"
        native = out / f"{pid}_attribution.nii.gz"
        if common.is_file() and native.is_file():  # done by an earlier, interrupted run
            volume = np.asarray(nib.load(str(common)).dataobj, dtype=np.float64)
            bar.update(len(run_windows(store, runs[pid], length)))
        else:
            try:
                model, factor = models[fold_of.get(pid, 0)]
                volume = participant_map(model, store, runs[pid], output, options, bar)
                volume = volume if factor is None else volume * factor[output]
                source = store.run(runs[pid][0]).attributes["source"]
                save_nifti(native, to_source_grid(volume, store_affine, source["shape"], np.array(source["affine"])),
                           np.array(source["affine"]))
                save_nifti(common, volume, store_affine)
            except (OSError, ValueError, KeyError) as err:
                print(f"neurox explain: {pid}: {err}; left out", file=sys.stderr)
                failed.append(pid)
                continue
        done.append(pid)
        sums.add(pid, volume)
        mask = store.mask(runs[pid][0])
        brain |= mask
        shares[pid] = outside_brain_share(volume, mask)
        if regions:
            participant_regions.append({"participant_id": pid, **{n: f"{m:.6g}" for n, m in zip(
                regions[2], region_means(volume, regions[0], regions[1])[1])}})
    bar.close()
    summary = {"run": str(run_dir), "store": str(store.root), "output": output_name, "method":
               "integrated_gradients" + ("+smoothgrad_sq" if options.noise_samples else ""),
               "options": asdict(options), "participants": sorted(done), "failed": failed, "groups": {},
               "contrasts": {}, "outside_brain_share": dict(sorted(shares.items()))}
    if fold_of:
        summary["tested_by_fold"] = {p: fold_of[p] for p in sorted(done)}
        summary["units"] = ("each participant explained by the model of the fold that tested them, its attributions "
                            "on the scale the folds' outputs are pooled on (a class's logit over that fold's "
                            "standard deviation on its validation participants; a number in its units)")
    if shares and np.mean(list(shares.values())) > 0.5:
        print(f"neurox explain: {100 * np.mean(list(shares.values())):.0f}% of the attribution lies outside the brain "
              "mask: the model may read a shortcut there (with global_zscore stores, the background value differs "
              "per run)", file=sys.stderr)
    included = set(done)

    def smoothed(mean: np.ndarray) -> np.ndarray:
        return smooth_in_brain(mean, brain, options.smooth_fwhm, float(store.info["voxel_size_mm"]))

    region_table: list[dict] = []
    for name, members in groups.items():
        mean = sums.mean(members)
        if mean is None:
            continue
        members = [p for p in members if p in included]
        if regions:
            region_table += region_rows(name, mean, *regions)
        mean = smoothed(mean)
        save_nifti(out / f"group-{name}_attribution.nii.gz", mean, store_affine)
        plot_map(out / f"group-{name}_attribution.png", mean, store_affine,
                 f"{output_name}: {name} (n={len(members)})")
        summary["groups"][name] = members
    for name, (plus, minus) in contrasts.items():
        plus_mean, minus_mean = sums.mean(plus), sums.mean(minus)
        if plus_mean is None or minus_mean is None:
            continue
        plus, minus = [p for p in plus if p in included], [p for p in minus if p in included]
        if regions:
            region_table += region_rows(name, plus_mean - minus_mean, *regions)
        difference = smoothed(plus_mean) - smoothed(minus_mean)
        save_nifti(out / f"group-{name}_attribution.nii.gz", difference, store_affine)
        plot_map(out / f"group-{name}_attribution.png", difference, store_affine,
                 f"{output_name}: {name} (n={len(plus)} vs {len(minus)})")
        summary["contrasts"][name] = {"plus": plus, "minus": minus}
    from neurox.io.atomic import write_text_atomic

    if regions:
        from neurox.data.store import write_tsv

        region_names, networks = regions[2], regions[3]
        write_tsv(out / "regions.tsv", region_table, ["map", "rank", "label", "region", *["network"] * bool(networks),
                                                      "voxels", "mean_attribution", "share"])
        if networks:
            network_table = network_rows(region_table)
            write_tsv(out / "networks.tsv", network_table,
                      ["map", "rank", "network", "voxels", "mean_attribution", "share"])
            summary["top_networks"] = {}
            for row in network_table:
                if row["rank"] <= 3:
                    summary["top_networks"].setdefault(row["map"], []).append(row["network"])
        write_tsv(out / "participant_regions.tsv", sorted(participant_regions, key=lambda r: r["participant_id"]),
                  ["participant_id", *region_names])
        summary["atlas"] = str(atlas)
        summary["top_regions"] = {}
        for row in region_table:
            if row["rank"] <= 5:
                summary["top_regions"].setdefault(row["map"], []).append(row["region"])
    write_text_atomic(out / "explain.json", json.dumps(summary, indent=2) + "\n")
    return out
