"""``neurox synth``: a synthetic cohort in fMRIPrep's BIDS-derivatives layout, with planted effects
whose location and kind are known, so that every command runs and can be checked without
restricted data.

The brain is the MNI152 brain mask that nilearn ships (no download). Parcels are Voronoi cells of
seed points chosen inside it, mirrored across hemispheres; networks are sets of bilateral parcel
pairs. A run's BOLD signal is band-limited network activity mixed into parcels, plus spatially
smooth noise, slow drift and optional motion-like spikes, on a tissue baseline. Four effects are
planted, one column of ``participants.tsv`` each:

- ``amplitude_group`` (binary, local): network A fluctuates with larger amplitude in group 1;
- ``coupling_group`` (binary, distributed): networks B and C, far apart, are more correlated in
  group 1, while each keeps unit variance;
- ``order_group`` (binary, temporal): networks D and E carry the same activity with a lag, D
  leading in group 0 and E leading in group 1: zero-lag correlations and variances are identical;
- ``lowfreq_score`` (continuous): network F's power below 0.03 Hz grows with the score.

With ``motion_effect`` above 0 a fifth column, ``motion_group`` (binary), plants no neural effect but a
confound: its group 1 moves more (``1 + motion_effect`` times the head jumps a run has, each with its
intensity spike), as groups that differ in age or diagnosis often do. A model, or FC, can tell the groups
apart only through motion, which the motion check and denoising are there to catch.

``ground_truth/`` holds each effect's voxel map, the parcel atlas and a JSON description. The same
options and seed give the same bytes.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from neurox.data.confounds import confounds_text
from neurox.io.atomic import atomic_path, write_text_atomic

N_NETWORKS = 8
NETWORK_NAMES = ("A", "B", "C", "D", "E", "F", "G", "H")
EFFECTS = {
    "amplitude_group": ("A",),
    "coupling_group": ("B", "C"),
    "order_group": ("D", "E"),
    "lowfreq_score": ("F",),
}
BASELINE = 1000.0  # tissue intensity
SIGNAL_GAIN = 20.0  # network fluctuations of about 2 % of the baseline, as in grey matter at 3 T
TISSUE_CONTRAST = 0.05  # spatial variation of the baseline across the brain (after bias correction)
NON_STEADY_EXCESS = 0.5  # the first non-steady-state frame is this much brighter than the steady state
SPACE = {2.0: "MNI152NLin2009cAsym_res-2", 4.0: "MNI152NLin2009cAsym_res-4"}


@dataclass(frozen=True)
class SynthOptions:
    n_subjects: int = 40
    n_runs: int = 1
    n_frames: int = 120
    tr: float = 0.8
    voxel_size_mm: float = 2.0
    effect_size: float = 1.0
    noise: float = 1.0
    motion_spikes: bool = True
    motion_effect: float = 0.0  # above 0: a motion_group column whose group 1 has (1 + this) times the spikes
    n_parcels: int = 40
    seed: int = 0
    non_steady_frames: int = 0  # leading frames brighter while the magnetisation settles, marked in the confounds

    def __post_init__(self):
        if self.voxel_size_mm not in SPACE:
            raise ValueError(f"voxel_size_mm must be 2 or 4, got {self.voxel_size_mm}")
        if self.n_subjects < 2 or self.n_runs < 1 or self.n_frames < 8:
            raise ValueError("need at least 2 subjects, 1 run and 8 frames")
        if self.n_parcels < 2 * N_NETWORKS + 2 or self.n_parcels % 2:
            raise ValueError(f"n_parcels must be even and at least {2 * N_NETWORKS + 2}")
        if self.motion_effect < 0 or (self.motion_effect > 0 and not self.motion_spikes):
            raise ValueError("motion_effect must be 0 or more, and needs motion_spikes")
        if not 0 <= self.non_steady_frames <= self.n_frames - 8:
            raise ValueError(f"non_steady_frames must be 0 to {self.n_frames - 8} (at least 8 frames after them)")


def spike_count(options: SynthOptions, subject: dict) -> int:
    """Spikes (head jumps) in one run: one a minute or so, ``1 + motion_effect`` times that in motion group 1."""
    if not options.motion_spikes:
        return 0
    count = max(1, options.n_frames // 60)
    if subject.get("motion_group"):
        count = min(int(round(count * (1 + options.motion_effect))), options.n_frames // 4)
    return count


# --- anatomy: mask, parcels, networks ----------------------------------------------------------


def mni_brain_mask(voxel_size_mm: float) -> nib.Nifti1Image:
    """nilearn's MNI152 brain mask at 2 mm, or resampled (nearest) to a 4 mm grid whose voxels
    align with neurox's default crop box."""
    try:
        from nilearn.datasets import load_mni152_brain_mask
    except ImportError:
        raise ImportError("neurox synth needs nilearn: pip install 'neurox-lbm[analysis]'") from None
    mask = load_mni152_brain_mask(resolution=2)
    if voxel_size_mm == 2.0:
        return nib.Nifti1Image((mask.get_fdata() > 0).astype(np.uint8), mask.affine)
    from nilearn.image import resample_img

    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = (-100.0, -136.0, -74.0)
    small = resample_img(mask, target_affine=affine, target_shape=(51, 56, 45), interpolation="nearest",
                         force_resample=True, copy_header=True)
    return nib.Nifti1Image((small.get_fdata() > 0).astype(np.uint8), affine)


def make_parcels(mask: np.ndarray, affine: np.ndarray, n_parcels: int, rng: np.random.Generator) -> np.ndarray:
    """Labels 1..n_parcels: Voronoi cells of seeds picked by farthest-point sampling in the right
    hemisphere and mirrored to the left, so parcel k and k + n/2 are a bilateral pair."""
    idx = np.argwhere(mask)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    right = world[world[:, 0] > 0]
    half = n_parcels // 2
    seeds = [right[rng.integers(len(right))]]
    distance = np.linalg.norm(right - seeds[0], axis=1)
    for _ in range(half - 1):
        seeds.append(right[int(np.argmax(distance))])
        distance = np.minimum(distance, np.linalg.norm(right - seeds[-1], axis=1))
    seeds = np.array(seeds)
    mirrored = seeds * np.array([-1.0, 1.0, 1.0])
    all_seeds = np.concatenate([seeds, mirrored])
    nearest = np.argmin(((world[:, None, :] - all_seeds[None]) ** 2).sum(-1), axis=1)
    labels = np.zeros(mask.shape, dtype=np.int16)
    labels[tuple(idx.T)] = nearest + 1
    return labels


def assign_networks(labels: np.ndarray, affine: np.ndarray, n_parcels: int,
                    rng: np.random.Generator) -> dict[str, list[int]]:
    """Each network: two bilateral parcel pairs. B and C are the two farthest-apart networks left
    after A, so that their coupling is a distributed effect."""
    half = n_parcels // 2
    right = rng.permutation(half)[: 2 * N_NETWORKS] + 1
    groups = [[int(a), int(b), int(a + half), int(b + half)] for a, b in right.reshape(N_NETWORKS, 2)]
    centroids = [np.mean([_centroid(labels, affine, p) for p in g], axis=0) for g in groups]
    rest = list(range(1, N_NETWORKS))
    pairs = [(i, j) for i in rest for j in rest if i < j]
    b, c = max(pairs, key=lambda p: np.linalg.norm(centroids[p[0]] - centroids[p[1]]))
    order = [0, b, c] + [i for i in rest if i not in (b, c)]
    return {name: groups[i] for name, i in zip(NETWORK_NAMES, order)}


def _centroid(labels, affine, parcel):
    idx = np.argwhere(labels == parcel)
    return (idx.mean(0) if len(idx) else np.zeros(3)) @ affine[:3, :3].T + affine[:3, 3]


# --- dynamics ----------------------------------------------------------------------------------


def band_limited(rng: np.random.Generator, n: int, tr: float, low: float, high: float) -> np.ndarray:
    """Unit-variance noise with power only between ``low`` and ``high`` Hz."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, d=tr)
    spectrum[(freqs < low) | (freqs > min(high, 0.5 / tr))] = 0
    signal = np.fft.irfft(spectrum, n)
    return (signal - signal.mean()) / (signal.std() + 1e-12)


def network_signals(rng, n: int, tr: float, subject: dict, effect_size: float) -> dict[str, np.ndarray]:
    signals = {name: band_limited(rng, n, tr, 0.01, 0.1) for name in NETWORK_NAMES}
    # amplitude: network A fluctuates more in group 1
    signals["A"] = signals["A"] * (1.0 + 0.5 * effect_size * subject["amplitude_group"])
    # coupling: C shares part of B's activity; unit variance either way
    rho = min(0.1 + 0.5 * effect_size * subject["coupling_group"], 0.95)
    signals["C"] = rho * signals["B"] + np.sqrt(1 - rho**2) * signals["C"]
    # temporal order: one activity, D leading in group 0 and E leading in group 1 (same zero-lag stats)
    lag = max(1, int(round(effect_size * 2.0 / tr)))
    long = band_limited(rng, n + lag, tr, 0.01, 0.1)
    early, late = long[lag:], long[:n]
    signals["D"], signals["E"] = (early, late) if subject["order_group"] == 0 else (late, early)
    # low-frequency power of F grows with the score
    slow = band_limited(rng, n, tr, 0.008, 0.03)
    signals["F"] = signals["F"] + effect_size * 1.5 * subject["lowfreq_score"] * slow
    return signals


def run_frames(rng, options: SynthOptions, subject: dict, anatomy: dict, block: int = 16, record: dict | None = None):
    """Yield blocks of frames (X, Y, Z, n) float32 of one run. ``record``, when given, receives what the
    run's confounds are made of: the spike frames, the global signal and the mean of each parcel in no
    network, frame by frame."""
    from scipy.ndimage import gaussian_filter

    n, tr = options.n_frames, options.tr
    labels, networks = anatomy["labels"], anatomy["networks"]
    mask = labels > 0
    signals = network_signals(rng, n, tr, subject, options.effect_size)
    parcel_signal = np.zeros((options.n_parcels + 1, n), dtype=np.float32)
    member = {p: name for name, parcels in networks.items() for p in parcels}
    for parcel in range(1, options.n_parcels + 1):
        own = band_limited(rng, n, tr, 0.01, 0.15)
        if parcel in member:
            parcel_signal[parcel] = 0.8 * signals[member[parcel]] + 0.6 * own
        else:
            parcel_signal[parcel] = own
    baseline = anatomy["baseline"]
    drift = rng.normal(0, 5.0, size=mask.shape).astype(np.float32) * mask
    spikes = set(rng.choice(n, size=spike_count(options, subject), replace=False).tolist()) if options.motion_spikes \
        else set()
    noise_scale = 8.0 * options.noise
    outside = sorted(set(range(1, options.n_parcels + 1)) - set(member))
    if record is not None:
        record.update(spikes=sorted(spikes), global_signal=np.zeros(n), outside=np.zeros((n, len(outside))))
        brain_labels = labels[mask]
        sizes = np.maximum(np.bincount(brain_labels, minlength=options.n_parcels + 1)[outside], 1)
    for start in range(0, n, block):
        stop = min(start + block, n)
        out = np.empty((*mask.shape, stop - start), dtype=np.float32)
        for i, t in enumerate(range(start, stop)):
            smooth = gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), sigma=1.0) * 2.5
            frame = baseline + SIGNAL_GAIN * parcel_signal[labels, t] + noise_scale * smooth
            frame += drift * (t / n - 0.5)
            if t in spikes:
                frame *= 1.02
            if t < options.non_steady_frames:  # the T1 saturation's excess, halving frame by frame (no draw: the
                frame *= 1 + NON_STEADY_EXCESS * 0.5**t  # frames after them keep their bytes)
            out[..., i] = np.where(mask, frame, 0.0)
            if record is not None:
                inside = frame[mask]
                record["global_signal"][t] = inside.mean()
                sums = np.bincount(brain_labels, weights=inside, minlength=options.n_parcels + 1)
                record["outside"][t] = sums[outside] / sizes
        yield out


# --- writing -----------------------------------------------------------------------------------


def write_nifti_streaming(path: Path, affine: np.ndarray, shape, tr: float, blocks) -> None:
    """A 4D float32 NIfTI written frame block by frame block through gzip (mtime 0: same bytes
    for the same data), atomically."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_xyzt_units("mm", "sec")
    header.set_zooms((*np.sqrt((affine[:3, :3] ** 2).sum(0)), tr))
    header.set_qform(affine, code=4)
    header.set_sform(affine, code=4)
    header["vox_offset"] = 352
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=1) as f:
            f.write(header.binaryblock)
            f.write(b"\x00" * 4)  # extension flag, then data at offset 352
            for frames in blocks:
                f.write(np.asfortranarray(frames, dtype="<f4").tobytes(order="F"))


def write_image(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=4)
    img.header.set_sform(affine, code=4)
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(img.to_bytes(), mtime=0))


def make_participants(options: SynthOptions, rng: np.random.Generator) -> list[dict]:
    n = options.n_subjects

    def balanced():
        return rng.permutation(np.arange(n) % 2).tolist()

    amplitude, coupling, order = balanced(), balanced(), balanced()
    score = np.round(rng.uniform(0, 1, n), 4).tolist()
    width = max(2, len(str(n)))
    rows = [{"participant_id": f"sub-{i + 1:0{width}d}", "amplitude_group": amplitude[i],
             "coupling_group": coupling[i], "order_group": order[i], "lowfreq_score": score[i]} for i in range(n)]
    if options.motion_effect > 0:  # its own generator: the cohort without it keeps every byte
        moving = np.random.default_rng([options.seed, 2]).permutation(np.arange(n) % 2)
        for row, group in zip(rows, moving.tolist()):
            row["motion_group"] = group
    return rows


def synthesize(out: str | Path, options: SynthOptions | None = None, progress: bool = True, workers: int = 1) -> Path:
    """Write the cohort to ``out`` (runs written by ``workers`` processes; every run's bytes depend only on
    the seed, the participant and the run, so any number of workers writes the same files); returns it."""
    from neurox.progress import progress as progress_display

    options = options or SynthOptions()
    out = Path(out)
    rng = np.random.default_rng(options.seed)
    mask_img = mni_brain_mask(options.voxel_size_mm)
    mask, affine = mask_img.get_fdata() > 0, mask_img.affine
    labels = make_parcels(mask, affine, options.n_parcels, rng)
    networks = assign_networks(labels, affine, options.n_parcels, rng)
    from scipy.ndimage import gaussian_filter

    tissue = gaussian_filter(rng.standard_normal(mask.shape), sigma=3.0)
    baseline = (BASELINE * (1.0 + TISSUE_CONTRAST * tissue / (tissue.std() + 1e-12)) * mask).astype(np.float32)
    anatomy = {"labels": labels, "networks": networks, "baseline": baseline}
    participants = make_participants(options, rng)

    write_text_atomic(out / "dataset_description.json", json.dumps({
        "Name": "neurox synthetic cohort", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "neurox synth", "Description": "synthetic BOLD with planted effects"}],
        "SynthOptions": asdict(options)}, indent=2) + "\n")
    columns = list(participants[0])
    write_text_atomic(out / "participants.tsv", "\n".join(
        ["\t".join(columns)] + ["\t".join(str(p[c]) for c in columns) for p in participants]) + "\n")
    write_ground_truth(out / "ground_truth", labels, networks, affine, options)

    space = SPACE[options.voxel_size_mm]
    jobs = [(p, r) for p in participants for r in range(1, options.n_runs + 1)]
    context = (out, options, anatomy, affine, mask, space)
    if workers > 1:
        from neurox.workers import process_pool

        with process_pool(workers) as pool:
            futures = [pool.submit(write_run, context, subject, run) for subject, run in jobs]
            for future in progress_display(futures, desc="synth", unit="run", disable=not progress):
                future.result()
    else:
        for subject, run in progress_display(jobs, desc="synth", unit="run", disable=not progress):
            write_run(context, subject, run)
    return out


def write_run(context, subject: dict, run: int) -> None:
    out, options, anatomy, affine, mask, space = context
    shape = (*mask.shape, options.n_frames)
    sub = subject["participant_id"]
    func = out / sub / "func"
    stem = f"{sub}_task-rest_run-{run}"
    run_rng = np.random.default_rng([options.seed, int(sub[4:]), run])
    bold = func / f"{stem}_space-{space}_desc-preproc_bold.nii.gz"
    confounds = func / f"{stem}_desc-confounds_timeseries.tsv"
    if not (bold.exists() and confounds.exists()):  # the confounds are made beside the frames: both, or again
        record: dict = {}
        write_nifti_streaming(bold, affine, shape, options.tr, run_frames(run_rng, options, subject, anatomy,
                                                                          record=record))
        confound_rng = np.random.default_rng([options.seed, int(sub[4:]), run, 1])
        write_text_atomic(confounds, confounds_text(synthetic_confounds(confound_rng, options, record)))
    write_image(func / f"{stem}_space-{space}_desc-brain_mask.nii.gz", mask.astype(np.uint8), affine)
    write_text_atomic(func / f"{stem}_space-{space}_desc-preproc_bold.json",
                      json.dumps({"RepetitionTime": options.tr, "SkullStripped": False}, indent=2) + "\n")


def synthetic_confounds(rng, options: SynthOptions, record: dict) -> dict[str, np.ndarray]:
    """The run's confounds in fMRIPrep's columns. Head motion is a slow random walk (about 0.1 mm of
    framewise displacement a frame) that jumps at the frames where the run has a spike (1 mm or more), so that
    scrubbing finds the spikes; the global signal is the in-brain mean; the synthetic brain has no
    tissue classes, so ``white_matter``, ``csf`` and ``a_comp_cor_*`` come from the parcels in no network
    (the means of their two halves, and their first five principal components); the cosine basis is
    fMRIPrep's 128 s high-pass."""
    n = options.n_frames
    steps = np.concatenate([rng.normal(0, 0.02, (n, 3)), rng.normal(0, 0.0003, (n, 3))], axis=1)  # mm, radians
    for t in record["spikes"]:
        # at least 0.3 mm on each axis: framewise displacement of 0.9 mm or more, far above the walk's
        jump = rng.choice([-1.0, 1.0], 3) * (0.3 + np.abs(rng.normal(0, 0.2, 3)))
        steps[t] += np.concatenate([jump, rng.normal(0, 0.005, 3)])
    steps[0] = 0
    motion = np.cumsum(steps, axis=0)
    table: dict[str, np.ndarray] = {}

    def expanded(name: str, values: np.ndarray) -> None:
        derivative = np.concatenate([[np.nan], np.diff(values)])
        table.update({name: values, f"{name}_derivative1": derivative, f"{name}_power2": values**2,
                      f"{name}_derivative1_power2": derivative**2})

    for i, name in enumerate(("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")):
        expanded(name, motion[:, i])
    displacement = np.abs(np.diff(motion, axis=0))
    fd = displacement[:, :3].sum(1) + 50 * displacement[:, 3:].sum(1)  # rotations on a 50 mm sphere (Power)
    table["framewise_displacement"] = np.concatenate([[np.nan], fd])
    outside = record["outside"]
    if outside.shape[1] == 0:  # every parcel in a network: the global signal stands in
        outside = record["global_signal"][:, None]
    half = max(outside.shape[1] // 2, 1)
    expanded("global_signal", record["global_signal"])
    expanded("white_matter", outside[:, :half].mean(1))
    expanded("csf", outside[:, half:].mean(1) if outside.shape[1] > 1 else outside[:, 0])
    centred = outside - outside.mean(0)
    components = np.linalg.svd(centred, full_matrices=False)[0] if centred.size else np.zeros((n, 0))
    for k in range(min(5, components.shape[1])):
        table[f"a_comp_cor_{k:02d}"] = components[:, k]
    n_cosines = int(np.floor(2 * n * options.tr / 128.0))
    frames = np.arange(n)
    for k in range(1, n_cosines + 1):
        table[f"cosine{k - 1:02d}"] = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * frames + 1) * k / (2 * n))
    for k in range(options.non_steady_frames):  # as fMRIPrep marks them: one column per frame
        table[f"non_steady_state_outlier{k:02d}"] = (frames == k).astype(float)
    return table


def write_ground_truth(folder: Path, labels, networks, affine, options: SynthOptions) -> None:
    space = SPACE[options.voxel_size_mm]
    write_image(folder / f"atlas-synthetic_space-{space}_dseg.nii.gz", labels.astype(np.int16), affine)
    rows = ["index\tname\tnetwork"]
    member = {p: name for name, parcels in networks.items() for p in parcels}
    for parcel in range(1, options.n_parcels + 1):
        rows.append(f"{parcel}\tparcel{parcel:03d}\t{member.get(parcel, 'none')}")
    write_text_atomic(folder / "atlas-synthetic_dseg.tsv", "\n".join(rows) + "\n")
    description = {}
    for column, names in EFFECTS.items():
        parcels = sorted(p for name in names for p in networks[name])
        effect_map = np.isin(labels, parcels).astype(np.uint8)
        filename = f"effect-{column}_space-{space}_mask.nii.gz"
        write_image(folder / filename, effect_map, affine)
        description[column] = {"networks": list(names), "parcels": parcels, "map": filename}
    if options.motion_effect > 0:
        description["motion_group"] = {
            "networks": [], "parcels": [], "map": None,
            "confound": "head motion: no neural effect; group 1 has more head jumps and intensity spikes per run",
            "spikes_per_run": [spike_count(options, {"motion_group": g}) for g in (0, 1)]}
    description["networks"] = networks
    write_text_atomic(folder / "ground_truth.json", json.dumps(description, indent=2) + "\n")
