"""Resampling runs in time onto one TR (``prepare --resample_tr``), and TRs that differ between stores."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fakes import OPTIONS, bids_run

from neurox.cli import main
from neurox.config import InputContract, preset
from neurox.data.prepare import options_from_model, prepare
from neurox.data.store import Store
from neurox.data.synthetic import SynthOptions, synthesize
from neurox.data.temporal import TemporalResampler, output_frames, resample_table, resampling_weights
from neurox.hub import save_pretrained
from neurox.models.swift import SwiFT
from neurox.train.runs import check_trs, store_contract, store_tr

PAIRS = [(2.0, 0.8), (0.72, 2.0), (0.72, 0.8), (3.0, 0.72)]  # up, down, near, far up


@pytest.mark.parametrize("tr_in,tr_out", PAIRS)
def test_streaming_in_blocks_equals_the_whole_run_through_the_weights(tr_in, tr_out):
    n = 50
    frames = np.random.default_rng(0).normal(size=(3, 4, 2, n)).astype(np.float32)
    whole = np.einsum("kj,xyzj->xyzk", resampling_weights(n, tr_in, tr_out), frames)
    for block in (1, 7, n):
        resampler = TemporalResampler(n, tr_in, tr_out)
        pieces = [resampler.push(frames[..., s : s + block]) for s in range(0, n, block)]
        streamed = np.concatenate(pieces, axis=3)
        assert resampler.done and streamed.shape == (3, 4, 2, output_frames(n, tr_in, tr_out))
        np.testing.assert_allclose(streamed, whole, atol=1e-5)
        assert len(resampler.held) == 0  # nothing kept once every output frame is out


@pytest.mark.parametrize("tr_in,tr_out", PAIRS)
def test_slow_fluctuations_survive_and_a_constant_stays_exact(tr_in, tr_out):
    n = int(240 / tr_in)  # four minutes
    t_in, t_out = np.arange(n) * tr_in, np.arange(output_frames(n, tr_in, tr_out)) * tr_out
    weights = resampling_weights(n, tr_in, tr_out)
    assert t_out[-1] <= t_in[-1] < t_out[-1] + tr_out  # the same span of time
    np.testing.assert_allclose(weights @ np.full(n, 7.5), 7.5, rtol=1e-12)  # a voxel's mean, the background
    inside = (t_out > 12) & (t_out < t_in[-1] - 12)  # away from the run's ends, where the kernel is cut
    for hz in (0.01, 0.05, 0.1):  # the band resting-state connectivity reads
        error = weights @ np.sin(2 * np.pi * hz * t_in) - np.sin(2 * np.pi * hz * t_out)
        assert np.abs(error[inside]).max() < 0.03, hz


def test_downsampling_removes_what_the_new_tr_cannot_hold_instead_of_aliasing_it():
    tr_in, tr_out, n = 0.72, 2.0, 400
    t_in = np.arange(n) * tr_in
    hz = 0.34  # above the new Nyquist frequency (0.25 Hz), below the old (0.69 Hz)
    fast = np.sin(2 * np.pi * hz * t_in)
    resampled = resampling_weights(n, tr_in, tr_out) @ fast
    picked = fast[np.round(np.arange(len(resampled)) * tr_out / tr_in).astype(int)]  # taking the nearest frame
    inside = slice(10, -10)
    assert np.std(picked[inside]) > 0.6  # aliased to 0.16 Hz at full strength
    assert np.std(resampled[inside]) < 0.1


def test_a_confounds_table_is_resampled_with_its_frames():
    tr_in, tr_out, n = 0.72, 2.0, 100
    t = np.arange(n) * tr_in
    table = {"trans_x": np.sin(2 * np.pi * 0.02 * t), "trans_x_derivative1": np.r_[np.nan, np.full(n - 1, 0.1)],
             "non_steady_state_outlier00": (np.arange(n) == 0).astype(float),
             "non_steady_state_outlier01": (np.arange(n) == 1).astype(float)}
    out = resample_table(table, tr_in, tr_out)
    m = output_frames(n, tr_in, tr_out)
    assert all(len(v) == m for v in out.values()) and not np.isnan(out["trans_x_derivative1"]).any()
    np.testing.assert_allclose(out["trans_x"], resampling_weights(n, tr_in, tr_out) @ table["trans_x"])
    # a marked frame marks every output frame whose kernel reaches it (3 TRs of 2 s: 6 s), and no other
    for name, at in (("non_steady_state_outlier00", 0.0), ("non_steady_state_outlier01", tr_in)):
        marked = np.flatnonzero(out[name])
        assert set(np.unique(out[name])) == {0.0, 1.0}
        assert np.array_equal(marked, np.flatnonzero(np.abs(np.arange(m) * tr_out - at) < 3 * tr_out))


def test_prepare_resamples_every_run_after_normalising_it(tmp_path):
    root = tmp_path / "bids"
    for i, sub in enumerate(["01", "02"]):
        bids_run(root, sub, n_frames=24, seed=i)  # TR 2 s
    assert prepare(root, tmp_path / "native", OPTIONS, progress=False).ok
    report = prepare(root, tmp_path / "fast", replace(OPTIONS, resample_tr=0.8), progress=False)
    assert report.ok
    native, fast = Store(tmp_path / "native"), Store(tmp_path / "fast")
    assert fast.info["resample_tr"] == 0.8 and native.info["resample_tr"] is None
    weights = resampling_weights(24, 2.0, 0.8)
    for run_id in native.run_ids:
        before, after = native.run(run_id), fast.run(run_id)
        assert after.n_frames == 58 == output_frames(24, 2.0, 0.8)  # 46 s in steps of 0.8 s
        row = next(r for r in fast.manifest if r["run_id"] == run_id)
        assert (row["tr"], row["n_frames"], row["shape"]) == ("0.8", "58", "48x48x48x58")
        assert after.attributes["resampled_in_time"] and after.attributes["source"]["tr"] == 2.0
        expected = np.einsum("kj,jxyz->kxyz", weights, before.read(0, 24).astype(np.float32))
        got = after.read(0, 58).astype(np.float32)
        np.testing.assert_allclose(got, expected, atol=0.01)  # float16 of both sides
        mask = after.attributes["mask"]
        assert mask == before.attributes["mask"]
    # runs already at the TR (to the float32 of a NIfTI header) are stored as they are
    assert prepare(root, tmp_path / "same", replace(OPTIONS, resample_tr=2.0000001), progress=False).ok
    same = Store(tmp_path / "same")
    for run_id in native.run_ids:
        assert not same.run(run_id).attributes["resampled_in_time"]
        assert np.array_equal(same.run(run_id).read(0, 24), native.run(run_id).read(0, 24))
    # a second pass skips every run; preparing into the store at another TR is refused
    assert prepare(root, tmp_path / "fast", replace(OPTIONS, resample_tr=0.8), progress=False).skipped
    with pytest.raises(ValueError, match=r"resample_tr=0.8 \(--resample_tr\), not 1.0"):
        prepare(root, tmp_path / "fast", replace(OPTIONS, resample_tr=1.0), progress=False)


def test_a_run_too_short_at_the_new_tr_fails_alone_and_the_dry_run_says_so(tmp_path, capsys):
    root = tmp_path / "bids"
    bids_run(root, "01", n_frames=24)
    bids_run(root, "02", n_frames=9)  # 16 s: 9 frames at 2 s, 6 at 3 s
    options = replace(OPTIONS, resample_tr=3.0)
    dry = prepare(root, tmp_path / "store", options, progress=False, dry_run=True)
    text = "\n".join(dry.survey)
    assert "every run resampled to 3 s" in text
    assert "fewer than --min_frames 8 frames at TR 3 s: sub-02_task-rest_run-1" in text
    report = prepare(root, tmp_path / "store", options, progress=False)
    assert list(report.failed) == ["sub-02_task-rest_run-1"]
    assert "6 frames at TR 3 s (9 at 2 s), fewer than one window (8)" in report.failed["sub-02_task-rest_run-1"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Six synthetic participants at TR 0.8 s, with fMRIPrep-like confounds."""
    return synthesize(tmp_path_factory.mktemp("temporal") / "cohort",
                      SynthOptions(n_subjects=6, n_frames=60, voxel_size_mm=4.0, seed=2), progress=False)


def test_a_model_of_a_resampled_store_carries_its_tr_and_connectivity_denoises_it(cohort, tmp_path, capsys):
    store = tmp_path / "store-2s"
    assert main(["prepare", str(cohort), "--out", str(store), "--voxel_size", "4", "--normalization",
                 "voxel_center", "--resample_tr", "2", "--min_frames", "8", "--quiet", "true"]) == 0
    reader = Store(store).run(Store(store).run_ids[0])
    assert reader.n_frames == output_frames(60, 0.8, 2.0) == 24
    confounds = reader.confounds()
    assert all(len(v) == 24 for v in confounds.values())  # one row per stored frame
    # the motion summary is the source's, at its own TR
    source = next((cohort / "sub-01" / "func").glob("*confounds_timeseries.tsv"))
    fd = np.genfromtxt(source, delimiter="\t", names=True, missing_values="n/a")["framewise_displacement"]
    assert reader.attributes["motion"]["mean_fd"] == pytest.approx(np.nanmean(fd), abs=1e-4)
    # connectivity denoises with the resampled confounds, and reads the same network structure as at the source's TR
    atlas = next((cohort / "ground_truth").glob("atlas-*_dseg.nii.gz"))
    assert main(["connectivity", "--store", str(store), "--atlas", str(atlas), "--confounds", "simple",
                 "--out", str(tmp_path / "fc-simple")]) == 0
    assert main(["prepare", str(cohort), "--out", str(tmp_path / "native"), "--voxel_size", "4", "--normalization",
                 "voxel_center", "--min_frames", "8", "--quiet", "true"]) == 0
    for name in ("store-2s", "native"):
        assert main(["connectivity", "--store", str(tmp_path / name), "--atlas", str(atlas),
                     "--out", str(tmp_path / f"fc-{name}")]) == 0
    resampled, native = (np.load(tmp_path / f"fc-{name}" / "connectivity.npz")["matrices"]
                         for name in ("store-2s", "native"))
    upper = np.triu_indices(native.shape[1], 1)
    for a, b in zip(resampled, native):
        assert np.corrcoef(a[upper], b[upper])[0, 1] > 0.99  # 0.999 measured
    capsys.readouterr()

    # a model trained on it records the TR and that the runs were resampled (the contract finetune and pretrain
    # write): prepare --like resamples new data onto it
    contract = InputContract.for_model(preset("demo"), tr=store_tr(Store(store)), **store_contract(Store(store).info))
    save_pretrained(SwiFT(preset("demo")), tmp_path / "model", contract=contract)
    assert options_from_model(tmp_path / "model").resample_tr == 2.0
    assert main(["prepare", str(cohort), "--out", str(tmp_path / "like"), "--like", str(tmp_path / "model"),
                 "--quiet", "true"]) == 0
    assert Store(tmp_path / "like").info["resample_tr"] == 2.0


def test_stores_of_different_trs_are_refused_together_and_a_mixed_store_is_a_warning(cohort, tmp_path, capsys):
    common = ["--voxel_size", "4", "--normalization", "voxel_center", "--min_frames", "8", "--quiet", "true"]
    assert main(["prepare", str(cohort), "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["prepare", str(cohort), "--out", str(tmp_path / "b"), "--resample_tr", "2", *common]) == 0
    assert main(["prepare", str(cohort), "--out", str(tmp_path / "c"), "--resample_tr", "0.75", *common]) == 0
    a, b, c = (Store(tmp_path / name) for name in "abc")
    check_trs([a, c])  # 0.8 and 0.75 s: within 10%, as HCP, UK Biobank and ABCD are
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"has runs of TR 2 s but .* of 0.8 s; .*--resample_tr, for example 0.8"):
        check_trs([a, b])
    assert main(["pretrain", "--store", str(tmp_path / "a"), "--store", str(tmp_path / "b"), "--objective", "mim",
                 "--out", str(tmp_path / "pre")]) == 1
    assert "stores trained together must share a TR" in capsys.readouterr().err

    # one store whose runs differ: a 2 s run among the 0.8 s ones
    mixed = tmp_path / "mixed"
    shutil.copytree(cohort, mixed)
    bids_run(mixed, "99", n_frames=24)
    assert main(["prepare", str(mixed), "--out", str(tmp_path / "m"), *common]) == 0
    check_trs([Store(tmp_path / "m")])
    assert "holds runs of TR 0.8 to 2 s" in capsys.readouterr().err
    # which the dry run says before anything is written
    dry = "\n".join(prepare(mixed, tmp_path / "n", OPTIONS, progress=False, dry_run=True).survey)
    assert "TR: 0.8 s (6 run(s)); 2 s (1 run(s))" in dry
    assert "TRs differ by more than 10%: a window of so many frames would span 2.5 times as long" in dry


def test_a_confounds_table_that_appears_later_is_resampled_onto_the_stored_frames(tmp_path):
    root = tmp_path / "bids"
    bold = bids_run(root, "01", n_frames=24)
    options = replace(OPTIONS, resample_tr=0.8)
    assert prepare(root, tmp_path / "store", options, progress=False).ok
    reader = Store(tmp_path / "store").run("sub-01_task-rest_run-1")
    assert reader.confounds() is None and reader.n_frames == 58
    fd = np.linspace(0.1, 0.3, 24)
    bold.with_name("sub-01_task-rest_run-1_desc-confounds_timeseries.tsv").write_text(
        "framewise_displacement\ttrans_x\n" + "".join(f"{v}\t{v / 10}\n" for v in fd))
    report = prepare(root, tmp_path / "store", options, progress=False)
    assert report.ok and report.skipped == ["sub-01_task-rest_run-1"] and not report.done  # frames kept
    table = Store(tmp_path / "store").run("sub-01_task-rest_run-1").confounds()
    np.testing.assert_allclose(table["framewise_displacement"], resampling_weights(24, 2.0, 0.8) @ fd, atol=1e-7)
    assert len(table["trans_x"]) == 58
    row = Store(tmp_path / "store").manifest[0]
    assert float(row["mean_fd"]) == pytest.approx(fd.mean(), abs=1e-4)  # the source's own, at its TR
