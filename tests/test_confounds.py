"""Confounds: kept by prepare beside each run, motion in the manifest, denoising in connectivity and the
FC baseline."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from fakes import AFFINE, OPTIONS, bids_run, brain_mask, save
from fakes import bold as bold_data

from neurox.analysis.baseline import BaselineConfig, baseline, evaluate_baseline
from neurox.cli import main
from neurox.config import InputContract, preset
from neurox.data.confounds import (
    MOTION_24,
    Denoising,
    confounds_text,
    denoise,
    motion_report,
    nuisance_design,
    read_confounds,
)
from neurox.data.grid import TargetGrid
from neurox.data.loader import Target
from neurox.data.prepare import options_from_model, prepare
from neurox.data.preprocess import PrepareOptions
from neurox.data.store import Store, read_tsv
from neurox.data.synthetic import SynthOptions, synthesize
from neurox.hub import save_pretrained
from neurox.io.nifti import InputError
from neurox.models.swift import SwiFT
from neurox.train.objectives import subject_metrics

N_FRAMES = 200


@pytest.fixture(scope="module")
def cohort_and_store(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("confounds")
    cohort = synthesize(root / "cohort", SynthOptions(n_subjects=10, n_frames=N_FRAMES, voxel_size_mm=4.0, seed=3),
                        progress=False, workers=2)
    assert prepare(cohort, root / "store", PrepareOptions(grid=TargetGrid.default(4.0)), progress=False, workers=2).ok
    return cohort, root / "store"


def source_table(cohort: Path, participant: str) -> dict[str, np.ndarray]:
    return read_confounds(next((cohort / participant / "func").glob("*_desc-confounds_timeseries.tsv")))


def test_prepare_keeps_the_confounds_and_the_motion_of_every_run(cohort_and_store):
    cohort, store_path = cohort_and_store
    store = Store(store_path)
    row = next(r for r in store.manifest if r["participant_id"] == "sub-01")
    kept = store.run(row["run_id"]).confounds()
    source = source_table(cohort, "sub-01")
    assert set(MOTION_24) <= set(kept) and {"framewise_displacement", "white_matter", "csf", "global_signal",
                                            "a_comp_cor_04", "cosine01"} <= set(kept)
    for name in ("trans_x", "framewise_displacement", "a_comp_cor_00"):
        assert np.allclose(kept[name], source[name], equal_nan=True, rtol=1e-6, atol=1e-9), name
    assert float(row["mean_fd"]) == pytest.approx(np.nanmean(source["framewise_displacement"]), abs=1e-4)
    # the synthetic spikes are where the head jumps: framewise displacement above 1 mm at those frames only
    assert float(row["max_fd"]) > 1.0 and np.sum(source["framewise_displacement"] > 0.5) == N_FRAMES // 60


def test_a_confounds_table_that_does_not_fit_fails_its_run_alone(tmp_path, capsys):
    root = tmp_path / "bids"
    for sub in ("01", "02"):
        bold = bids_run(root, sub, n_frames=24)
        rows = 24 if sub == "01" else 20
        bold.with_name(f"sub-{sub}_task-rest_run-1_desc-confounds_timeseries.tsv").write_text(
            "framewise_displacement\ttrans_x\tunused\n" + "n/a\t0\t7\n" + "0.1\t0.01\t7\n" * (rows - 1))
    report = prepare(root, tmp_path / "store", OPTIONS, progress=False)
    assert len(report.done) == 1 and list(report.failed) == ["sub-02_task-rest_run-1"]
    assert "20 rows for the 24 frames" in report.failed["sub-02_task-rest_run-1"]
    assert "desc-confounds_timeseries.tsv" in capsys.readouterr().err
    kept = Store(tmp_path / "store").run("sub-01_task-rest_run-1").confounds()
    # only the columns a strategy uses, and the global signal the table lacked, computed in the brain mask
    assert sorted(kept) == ["framewise_displacement", "global_signal", "trans_x"]


def test_denoising_removes_a_shared_nuisance_and_scrubbing_drops_frames():
    rng = np.random.default_rng(0)
    n = 300
    nuisance = rng.standard_normal(n)
    series = rng.standard_normal((n, 4)) + 2.0 * nuisance[:, None]  # four parcels, correlated only by it
    table = {name: 0.01 * rng.standard_normal(n) for name in MOTION_24}
    table.update(white_matter=nuisance, csf=rng.standard_normal(n), global_signal=series.mean(1),
                 framewise_displacement=np.abs(rng.normal(0.1, 0.03, n)))
    table["framewise_displacement"][[10, 50, 51]] = 1.2
    before = np.corrcoef(series.T)[np.triu_indices(4, 1)]
    after = Denoising("simple").apply(series, table, "run x")
    assert before.min() > 0.7 and np.abs(np.corrcoef(after.T)[np.triu_indices(4, 1)]).max() < 0.2
    assert after.shape == (n, 4)
    scrubbed = Denoising("scrubbing", fd_threshold=0.5).apply(series, table, "run x")
    assert scrubbed.shape == (n - 3, 4)
    with pytest.raises(InputError, match="run x: only .* frames left after scrubbing at 0.05 mm"):
        Denoising("scrubbing", fd_threshold=0.05).apply(series, table, "run x")
    with pytest.raises(InputError, match="run x: no column.*a_comp_cor_00.*--confounds compcor"):
        Denoising("compcor").apply(series, table, "run x")
    with pytest.raises(InputError, match="run x: no confounds stored"):
        Denoising("simple").apply(series, None, "run x")
    with pytest.raises(ValueError, match="unknown confounds strategy 'aroma'"):
        Denoising("aroma")
    assert Denoising().apply(series, None, "run x") is series  # none: the series as they are


def test_connectivity_and_baseline_denoise_as_asked(cohort_and_store, tmp_path, capsys):
    cohort, store = cohort_and_store
    atlas = next((cohort / "ground_truth").glob("atlas-synthetic_space-*_dseg.nii.gz"))
    out = tmp_path / "fc"
    assert main(["connectivity", "--store", str(store), "--atlas", str(atlas), "--out", str(out),
                 "--confounds", "scrubbing", "--quiet", "true"]) == 0
    data = np.load(out / "connectivity.npz")
    assert json.loads(str(data["denoising"])) == {"strategy": "scrubbing", "fd_threshold": 0.5, "global_signal": False}
    series = np.load(out / "parcel_series.npz")
    run = next(k for k in series.files if k.startswith("sub-01"))
    assert series[run].shape == (N_FRAMES - N_FRAMES // 60, 40)  # the spike frames are gone
    fd = {r["participant_id"]: float(r["mean_fd"]) for r in read_tsv(out / "participants.tsv")}
    assert fd["sub-01"] == pytest.approx(np.nanmean(source_table(cohort, "sub-01")["framewise_displacement"]), abs=1e-3)

    config = BaselineConfig(store=str(store), target="coupling_group", out=str(tmp_path / "fc-base"), atlas=str(atlas),
                            confounds="compcor", n_boot=20, split_fractions=(0.75, 0.125, 0.125))
    run_dir = baseline(config, progress=False)
    fitted = json.loads((run_dir / "metrics.json").read_text())
    again = evaluate_baseline(run_dir, store, n_boot=20)  # evaluated as it was fitted: with compcor
    assert again["test"]["auroc"] == pytest.approx(fitted["test"]["auroc"])
    predictions = read_tsv(run_dir / "predictions.tsv")
    assert [float(r["mean_fd"]) for r in predictions] == [fd[r["participant_id"]] for r in predictions]
    for split, metrics in again.items():  # the motion check, where there are participants enough to correlate
        assert ("mean_fd_r" in metrics) == (metrics["n_subjects"] >= 5), split

    # the tangent space: the reference is the training participants' geometric mean, kept with the fit and
    # applied again by evaluate
    tangent = baseline(replace(config, kind="tangent", out=str(tmp_path / "fc-tangent")), progress=False)
    reference = np.load(tangent / "baseline.npz")["tangent_reference"]
    assert reference.shape == (40, 40) and np.allclose(reference, reference.T)
    assert np.linalg.eigvalsh(reference).min() > 0
    fitted = json.loads((tangent / "metrics.json").read_text())
    assert evaluate_baseline(tangent, store, n_boot=20)["test"]["auroc"] == pytest.approx(fitted["test"]["auroc"])
    assert -1 <= again["train"]["mean_fd_r"] <= 1


def test_the_motion_check_correlates_outputs_and_target_with_motion():
    targets = [Target(column="age", task="regression", mean=50.0, std=10.0)]
    people = [f"sub-{i}" for i in range(8)]
    fd = {p: 0.1 + 0.05 * i for i, p in enumerate(people)}
    outputs = np.array([[2.0 * fd[p]] for p in people])  # a model that reads motion
    labels = {p: np.array([(-1.0) ** i], dtype=np.float32) for i, p in enumerate(people)}
    metrics, _, _ = subject_metrics(targets, people, outputs, labels, n_boot=10, motion=fd)
    assert metrics["mean_fd_r"] == pytest.approx(1.0)
    assert abs(metrics["target_mean_fd_r"]) < 0.3
    few, _, _ = subject_metrics(targets, people[:4], outputs[:4], labels, n_boot=10, motion=fd)
    assert "mean_fd_r" not in few
    none, _, _ = subject_metrics(targets, people, outputs, labels, n_boot=10)
    assert "mean_fd_r" not in none


def test_denoising_a_store_without_confounds_says_so(tmp_path, capsys):
    root = tmp_path / "bids"
    for sub in ("01", "02"):
        bids_run(root, sub, n_frames=24)
    prepare(root, tmp_path / "store", OPTIONS, progress=False)
    atlas = tmp_path / "atlas.nii.gz"
    labels = (brain_mask() * (1 + (np.indices(brain_mask().shape)[0] > 20))).astype(np.int16)  # two parcels
    nib.save(nib.Nifti1Image(labels, AFFINE), str(atlas))
    assert main(["connectivity", "--store", str(tmp_path / "store"), "--atlas", str(atlas), "--out",
                 str(tmp_path / "fc"), "--confounds", "simple", "--quiet", "true"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all("no confounds stored for --confounds simple" in line for line in err[:2])
    assert "no participant's runs could be read" in err[2]


def test_preparing_again_adds_confounds_a_run_was_prepared_without(tmp_path, capsys):
    root = tmp_path / "bids"
    bolds = [bids_run(root, sub, n_frames=24) for sub in ("01", "02")]
    assert prepare(root, tmp_path / "store", OPTIONS, progress=False).ok
    store = Store(tmp_path / "store")
    assert store.run("sub-01_task-rest_run-1").confounds() is None and store.manifest[0]["mean_fd"] == ""
    frames = store.read_window("sub-01_task-rest_run-1", start=0, length=8)
    for bold, rows in zip(bolds, (24, 23)):  # fMRIPrep's tables appear later; the second does not fit
        bold.with_name(bold.name.split("_space-")[0] + "_desc-confounds_timeseries.tsv").write_text(
            "framewise_displacement\n" + "n/a\n" + "0.2\n" * (rows - 1))
    assert main(["prepare", str(root), "--out", str(tmp_path / "store"), "--voxel_size", "4", "--min_frames", "8",
                 "--quiet", "true"]) == 0
    out, err = capsys.readouterr()
    assert "0 prepared, 2 already done, 0 failed" in out  # no frame prepared twice
    assert "head motion of 1 run(s): median mean framewise displacement 0.200 mm; 0 above 0.5 mm" in out
    assert "23 rows for the 24 frames" in err
    assert np.array_equal(store.read_window("sub-01_task-rest_run-1", start=0, length=8), frames)
    assert store.run("sub-01_task-rest_run-1").confounds()["framewise_displacement"][1] == pytest.approx(0.2)
    assert store.run("sub-02_task-rest_run-1").confounds() is None
    fd = {row["run_id"]: row["mean_fd"] for row in store.manifest}
    assert float(fd["sub-01_task-rest_run-1"]) == pytest.approx(0.2) and fd["sub-02_task-rest_run-1"] == ""


def test_the_motion_summary_names_the_runs_that_moved_most():
    rows = [{"run_id": f"sub-{i}_run-1", "status": "ok", "mean_fd": str(fd)} for i, fd in enumerate((0.1, 0.7, 0.2))]
    rows.append({"run_id": "sub-9_run-1", "status": "failed", "mean_fd": ""})
    line = motion_report(SimpleNamespace(manifest=rows, info={}))
    assert line == ("head motion of 3 run(s): median mean framewise displacement 0.200 mm; 1 above 0.5 mm "
                    "(sub-1_run-1; mean_fd in manifest.tsv)")
    assert motion_report(SimpleNamespace(manifest=rows[3:], info={})) is None


def test_a_motion_confounded_target_is_caught_and_denoising_removes_it(tmp_path, capsys):
    # motion_group has no neural effect: its group 1 only moves more (four times the head jumps and spikes)
    cohort = synthesize(tmp_path / "cohort", SynthOptions(n_subjects=16, n_frames=120, voxel_size_mm=4.0,
                                                          motion_effect=3.0, seed=5), progress=False, workers=2)
    truth = json.loads((cohort / "ground_truth" / "ground_truth.json").read_text())["motion_group"]
    assert truth["spikes_per_run"] == [2, 8] and truth["map"] is None
    assert prepare(cohort, tmp_path / "store", PrepareOptions(grid=TargetGrid.default(4.0)), progress=False,
                   workers=2).ok
    store = Store(tmp_path / "store")
    group = {r["participant_id"]: int(r["motion_group"]) for r in store.phenotypes()}
    fd = {r["participant_id"]: float(r["mean_fd"]) for r in store.manifest}
    assert sorted(group.values()) == [0] * 8 + [1] * 8
    assert min(fd[p] for p in group if group[p]) > max(fd[p] for p in group if not group[p])

    atlas = str(next((cohort / "ground_truth").glob("atlas-*_dseg.nii.gz")))
    mean_fc = {}
    for strategy in ("none", "scrubbing"):
        main(["connectivity", "--store", str(tmp_path / "store"), "--atlas", atlas, "--confounds", strategy,
              "--out", str(tmp_path / f"fc-{strategy}"), "--quiet", "true"])
        result = np.load(tmp_path / f"fc-{strategy}" / "connectivity.npz")
        upper = np.triu_indices(result["matrices"].shape[1], 1)
        per_participant = dict(zip(result["participants"].tolist(), result["matrices"][:, upper[0], upper[1]].mean(1)))
        mean_fc[strategy] = [np.mean([v for p, v in per_participant.items() if group[p] == g]) for g in (0, 1)]
    # the spikes add one signal to every parcel: FC is higher in the group that moves more, until scrubbed
    assert mean_fc["none"][1] - mean_fc["none"][0] > 0.02
    assert abs(mean_fc["scrubbing"][1] - mean_fc["scrubbing"][0]) < 0.5 * (mean_fc["none"][1] - mean_fc["none"][0])

    capsys.readouterr()
    main(["baseline", "--store", str(tmp_path / "store"), "--target", "motion_group", "--atlas", atlas,
          "--split_fractions", "[0.3,0.35,0.35]", "--out", str(tmp_path / "fc-baseline")])
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "fc-baseline" / "metrics.json").read_text())
    checked = [m["target_mean_fd_r"] for m in metrics.values() if "target_mean_fd_r" in m]  # splits of 5 or more
    assert len(checked) >= 1 and min(checked) > 0.8
    assert "warning: motion_group goes with head motion" in out and "--confounds scrubbing" in out


def test_motion_warnings_name_the_target_only_where_motion_is_significant():
    from scipy.stats import pearsonr

    from neurox.train.metrics import correlation_p, motion_warnings

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(30), rng.standard_normal(30)
    b += a
    assert correlation_p(float(np.corrcoef(a, b)[0, 1]), 30) == pytest.approx(pearsonr(a, b).pvalue, rel=1e-6)
    quiet = {"val": {"auroc": 0.9, "mean_fd_r": 0.2, "target_mean_fd_r": 0.1, "n_subjects": 20}}
    assert motion_warnings(quiet, "sex") == []
    (line,) = motion_warnings({"val": {"mean_fd_r": 0.3, "target_mean_fd_r": 0.7, "n_subjects": 20},
                               "test": {"mean_fd_r": 0.3, "target_mean_fd_r": 0.7, "n_subjects": 20}}, "sex")
    assert line.startswith("warning: sex goes with head motion (val: r = 0.70 with mean FD over 20 participants")
    (line,) = motion_warnings({"test": {"age.mean_fd_r": 0.8, "age.target_mean_fd_r": 0.1, "n_subjects": 20}})
    assert line.startswith("warning: the outputs for age follow head motion more than age does (test: r = 0.80")


# --- denoising the model's input in prepare ---------------------------------------------------------------


def nuisance_run(root: Path, n_frames: int = 40) -> tuple[Path, dict[str, np.ndarray]]:
    """A BIDS run whose every brain voxel carries a white-matter-like nuisance (at its own gain), with an
    fMRIPrep confounds table that names it, and a non-steady first frame."""
    rng = np.random.default_rng(7)
    table = {name: rng.standard_normal(n_frames) * 0.1 for name in MOTION_24}
    table["white_matter"] = np.sin(np.arange(n_frames) / 3.0)
    table["csf"] = rng.standard_normal(n_frames)
    table["cosine00"] = np.cos(np.pi * (2 * np.arange(n_frames) + 1) / (2 * n_frames))
    table["non_steady_state_outlier00"] = (np.arange(n_frames) == 0).astype(float)
    data = bold_data(n_frames, seed=4)
    gain = 30 * rng.uniform(0.5, 1.5, data.shape[:3]) * brain_mask()
    data += gain[..., None] * table["white_matter"]
    data[..., 0] += 400 * brain_mask()  # the scanner's first, brighter frame
    func = root / "sub-01" / "func"
    path = save(func / "sub-01_task-rest_space-MNI152NLin2009cAsym_res-4_desc-preproc_bold.nii.gz", data)
    save(func / "sub-01_task-rest_space-MNI152NLin2009cAsym_res-4_desc-brain_mask.nii.gz",
         brain_mask().astype(np.uint8))
    (func / "sub-01_task-rest_desc-confounds_timeseries.tsv").write_text(confounds_text(table))
    return path, table


def test_prepare_regresses_the_confounds_out_of_every_voxel_exactly(tmp_path):
    _, table = nuisance_run(tmp_path / "bids")
    plain = replace_options(normalization="voxel_center", non_steady_state="keep")
    assert prepare(tmp_path / "bids", tmp_path / "plain", plain, progress=False).ok
    assert main(["prepare", str(tmp_path / "bids"), "--out", str(tmp_path / "denoised"), "--voxel_size", "4",
                 "--min_frames", "8", "--normalization", "voxel_center", "--confounds", "simple",
                 "--non_steady_state", "keep", "--quiet", "true"]) == 0
    before, after = Store(tmp_path / "plain"), Store(tmp_path / "denoised")
    assert before.info["denoising"] == "none" and after.info["denoising"] == "simple"
    run_id = after.run_ids[0]
    mask = after.mask(run_id)
    scale = [s.run(run_id).attributes["normalization"]["temporal_std"] for s in (before, after)]
    y = before.run(run_id).read(0, 40).astype(np.float64)[:, mask] * scale[0]  # the centred input, in its units
    z = after.run(run_id).read(0, 40).astype(np.float64)[:, mask] * scale[1]
    # the reference: per voxel least squares on every frame but the non-steady one, which is set to the mean
    design, keep = nuisance_design(table, "simple")
    expected = np.zeros_like(y)
    expected[keep] = denoise(y, design, keep)
    assert np.abs(z - expected).max() < 2e-3 * np.abs(y[keep]).max()  # float16 storage
    assert np.abs(np.corrcoef(z[keep].mean(1), table["white_matter"][keep])[0, 1]) < 0.05
    assert np.corrcoef(y[keep].mean(1), table["white_matter"][keep])[0, 1] > 0.9
    assert after.run(run_id).attributes["denoising"] == {"confounds": "simple", "regressors": 24 + 2 + 1 + 1}


def test_leading_non_steady_state_frames_are_left_out_of_the_store(tmp_path, capsys):
    _, table = nuisance_run(tmp_path / "bids")  # its first frame is marked, and 400 brighter
    assert prepare(tmp_path / "bids", tmp_path / "kept", replace_options(non_steady_state="keep"), progress=False).ok
    assert main(["prepare", str(tmp_path / "bids"), "--out", str(tmp_path / "dropped"), "--voxel_size", "4",
                 "--min_frames", "8", "--quiet", "true"]) == 0
    assert ("leading non-steady-state frames dropped from 1 of 1 run(s) (1 each; non_steady_state_dropped in "
            "manifest.tsv)") in capsys.readouterr().out
    kept, dropped = Store(tmp_path / "kept"), Store(tmp_path / "dropped")
    assert (kept.info["non_steady_state"], dropped.info["non_steady_state"]) == ("keep", "drop")
    run_id = dropped.run_ids[0]
    run = dropped.run(run_id)
    assert run.n_frames == 39 and run.attributes["non_steady_state_dropped"] == 1
    assert [s.manifest[0]["non_steady_state_dropped"] for s in (kept, dropped)] == ["0", "1"]
    stored = run.confounds()  # one row per stored frame, and no column marking nothing
    assert "non_steady_state_outlier00" not in stored and len(stored["white_matter"]) == 39
    assert len(stored["global_signal"]) == 39  # what the frames give is computed from the frames kept
    assert np.allclose(stored["white_matter"], table["white_matter"][1:], atol=1e-7)
    # the same signal, less the first frame, which no longer shapes the normalisation
    mask = dropped.mask(run_id)
    signal = []
    for store, first in ((kept, 1), (dropped, 0)):
        stats = store.run(run_id).attributes["normalization"]
        signal.append(store.run(run_id).read(first, 39).astype(np.float64)[:, mask] * stats["std"] + stats["mean"])
    assert np.abs(signal[0] - signal[1]).max() < 1.0  # float16 storage, of values about 1000
    first_frame = kept.run(run_id).read(0, 1).astype(np.float64)[:, mask].mean()
    assert first_frame > 3 and abs(run.read(0, 1).astype(np.float64)[:, mask].mean()) < 1  # z-scores: the bright one
    # a store from before the setting kept them: preparing into it keeps doing so, and asking otherwise is refused
    info = json.loads((tmp_path / "kept" / "store.json").read_text())
    del info["non_steady_state"]
    (tmp_path / "kept" / "store.json").write_text(json.dumps(info))
    assert prepare(tmp_path / "bids", tmp_path / "kept", OPTIONS, progress=False).skipped == [run_id]
    with pytest.raises(ValueError, match=r"prepared with non_steady_state=keep \(--non_steady_state\), not drop"):
        prepare(tmp_path / "bids", tmp_path / "kept", replace_options(non_steady_state="drop"), progress=False)
    # the dry run counts them, and a run left too short by them fails alone
    survey = prepare(tmp_path / "bids", tmp_path / "new", OPTIONS, progress=False, dry_run=True).survey
    assert "leading non-steady-state frames dropped: 1 frame(s) (1 run(s))" in survey
    report = prepare(tmp_path / "bids", tmp_path / "short", replace_options(min_frames=40), progress=False)
    assert "39 frames after its 1 leading non-steady-state frame(s), fewer than one window" in report.failed[run_id]


def test_a_run_without_fmripreps_markers_has_its_leading_bright_frames_found(tmp_path):
    data = bold_data(40, seed=3)
    save(tmp_path / "in" / "steady.nii.gz", data)
    data[..., :3] *= np.array([1.5, 1.25, 1.125], dtype=np.float32)  # settling, as the synthetic cohort plants it
    settling = save(tmp_path / "in" / "settling.nii.gz", data)
    save(tmp_path / "in" / "after.nii.gz", data[..., 3:])
    manifest = tmp_path / "in" / "runs.tsv"
    manifest.write_text("participant_id\tpath\nsub-a\tsettling.nii.gz\nsub-b\tsteady.nii.gz\n")
    survey = prepare(manifest, tmp_path / "store", OPTIONS, progress=False, dry_run=True).survey
    assert ("leading non-steady-state frames dropped: found in their first 40 frames when prepared (2 run(s) "
            "without fMRIPrep's markers)") in survey
    assert prepare(manifest, tmp_path / "store", OPTIONS, progress=False).ok
    store = Store(tmp_path / "store")
    assert {r["participant_id"]: r["non_steady_state_dropped"] for r in store.manifest} == {"sub-a": "3", "sub-b": "0"}
    # the store holds what the run after them would give
    assert prepare(tmp_path / "in" / "after.nii.gz", tmp_path / "after", OPTIONS, progress=False).ok
    after = Store(tmp_path / "after")
    assert np.array_equal(store.run("sub-a").read(0, 37), after.run(after.run_ids[0]).read(0, 37))
    # kept where asked
    report = prepare(settling, tmp_path / "kept", replace_options(non_steady_state="keep"), progress=False)
    kept = Store(tmp_path / "kept")
    assert report.ok and kept.run(kept.run_ids[0]).n_frames == 40


def replace_options(**changes) -> PrepareOptions:
    return replace(OPTIONS, **changes)


def test_input_denoising_is_part_of_the_contract(tmp_path, capsys):
    model = SwiFT(preset("demo"))
    save_pretrained(model, tmp_path / "model", contract=InputContract.for_model(
        model.config, normalization="voxel_center", denoising="compcor+global_signal"))
    options = options_from_model(tmp_path / "model")
    assert (options.confounds, options.global_signal, options.denoising) == ("compcor", True, "compcor+global_signal")
    with pytest.raises(ValueError, match="censoring removes frames a window needs"):
        replace_options(confounds="scrubbing")
    # a run without a confounds table fails alone, in one line naming it
    bids_run(tmp_path / "bids", "02", n_frames=12)
    report = prepare(tmp_path / "bids", tmp_path / "store", replace_options(confounds="simple"), progress=False)
    assert "no confounds table for --confounds simple" in report.failed["sub-02_task-rest_run-1"]
    # a store keeps one denoising
    with pytest.raises(ValueError, match=r"prepared with denoising=simple \(--confounds, --global_signal\), not "
                                         "none; give the same to add runs"):
        prepare(tmp_path / "bids", tmp_path / "store", OPTIONS, progress=False)


def test_runs_above_a_motion_threshold_are_excluded_from_every_command(tmp_path):
    from neurox.data.loader import prepared_runs

    root = tmp_path / "bids"
    for sub, fd in (("01", 0.1), ("02", 0.8), ("03", 0.2)):
        path = bids_run(root, sub, n_frames=12)
        path.with_name(f"sub-{sub}_task-rest_run-1_desc-confounds_timeseries.tsv").write_text(
            "framewise_displacement\n" + "n/a\n" + f"{fd}\n" * 11)
    report = prepare(root, tmp_path / "store", OPTIONS, progress=False, max_mean_fd=0.5)
    assert report.ok and len(report.done) == 3  # prepared all the same: the threshold can change later
    store = Store(tmp_path / "store")
    assert [r["status"] for r in store.manifest] == ["ok", "excluded", "ok"]
    assert store.run_ids == ["sub-01_task-rest_run-1", "sub-03_task-rest_run-1"]
    assert sorted(prepared_runs(store)[0]) == ["sub-01", "sub-03"]
    assert motion_report(store).endswith("1 excluded above --max_mean_fd 0.5 mm (status in manifest.tsv)")
    prepare(root, tmp_path / "store", OPTIONS, progress=False, max_mean_fd=0)  # no threshold: all back
    assert [r["status"] for r in Store(tmp_path / "store").manifest] == ["ok"] * 3
    with pytest.raises(ValueError, match="--max_mean_fd -1"):
        prepare(root, tmp_path / "store", OPTIONS, progress=False, max_mean_fd=-1)


def test_a_table_that_appears_beside_a_run_prepared_without_a_mask_is_added(tmp_path):
    save(tmp_path / "run.nii.gz", bold_data(12))
    (tmp_path / "runs.tsv").write_text("participant_id\tpath\nsub-1\trun.nii.gz\n")
    assert prepare(tmp_path / "runs.tsv", tmp_path / "store", OPTIONS, progress=False).ok
    (tmp_path / "c.tsv").write_text("framewise_displacement\nn/a\n" + "0.1\n" * 11)
    (tmp_path / "runs.tsv").write_text("participant_id\tpath\tconfounds\nsub-1\trun.nii.gz\tc.tsv\n")
    report = prepare(tmp_path / "runs.tsv", tmp_path / "store", OPTIONS, progress=False)
    assert report.ok and report.skipped == ["sub-1"]  # no brain mask given: nothing computed from the frames
    run = Store(tmp_path / "store").run("sub-1")
    assert set(run.confounds()) == {"framewise_displacement"} and run.attributes["computed_confounds"] == []
