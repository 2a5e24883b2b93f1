"""``neurox prepare``: input forms, normalisations, bad inputs, crash-and-resume, orientation."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from fakes import AFFINE, OPTIONS, as_las, bids_run, bold, brain_mask, save, truncate_gzip

from neurox.cli import main
from neurox.data.grid import TargetGrid
from neurox.data.prepare import LOCK_FILE, options_from_model, prepare, unfinished_runs, write_manifest
from neurox.data.store import Store, read_tsv
from neurox.errors import UnreadableRun
from neurox.io.nifti import InputError


def store_contents(root: Path) -> dict:
    """Everything a store holds, for comparing two stores."""
    store = Store(root)
    contents = {}
    for run_id in store.run_ids:
        reader = store.run(run_id)
        attributes = dict(reader.attributes)
        contents[run_id] = (reader.read(0, reader.n_frames), json.dumps(attributes, sort_keys=True))
    return contents


def assert_same_store(a: Path, b: Path) -> None:
    ca, cb = store_contents(a), store_contents(b)
    assert ca.keys() == cb.keys()
    for run_id in ca:
        assert np.array_equal(ca[run_id][0], cb[run_id][0]), run_id
        assert ca[run_id][1] == cb[run_id][1], run_id


@pytest.fixture
def cohort(tmp_path) -> Path:
    root = tmp_path / "derivatives"
    for i, sub in enumerate(["01", "02", "03"]):
        bids_run(root, sub, seed=i)
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\nsub-02\t40\nsub-03\t50\n")
    # fMRIPrep also writes native-space runs: they must not be picked up
    bids_run(root, "01", space="T1w")
    return root


# --- input forms -------------------------------------------------------------------------------


def test_bids_folder(cohort, tmp_path):
    report = prepare(cohort, tmp_path / "store", OPTIONS, progress=False)
    assert report.ok and len(report.done) == 3
    store = Store(tmp_path / "store")
    assert store.run_ids == ["sub-01_task-rest_run-1", "sub-02_task-rest_run-1", "sub-03_task-rest_run-1"]
    row = store.manifest[0]
    assert (row["participant_id"], row["run"], row["tr"], row["shape"]) == ("sub-01", "1", "2.0", "48x48x48x24")
    assert [r["age"] for r in store.phenotypes()] == ["30", "40", "50"]
    window = store.read_window("sub-02_task-rest_run-1", 4, 8)
    assert window.shape == (1, 48, 48, 48, 8) and window.dtype == np.float16
    attributes = store.run("sub-02_task-rest_run-1").attributes
    assert attributes["mask_source"] == "given"
    assert attributes["source"]["sha256"] and attributes["crop_box_mm"] == [[-96, 92], [-112, 76], [-90, 98]]


def test_the_confounds_table_is_found_by_either_of_fmripreps_names(tmp_path):
    from neurox.io.bids import discover

    for sub, names in (("01", ["timeseries"]), ("02", ["regressors"]), ("03", ["regressors", "timeseries"])):
        func = bids_run(tmp_path, sub, n_frames=8).parent
        for name in names:  # fMRIPrep 20.2 and later; 1.4 to 20.1
            (func / f"sub-{sub}_task-rest_run-1_desc-confounds_{name}.tsv").write_text("csf\n" + "1\n" * 8)
    found = [spec.confounds.name for spec in discover(tmp_path)]
    assert found == ["sub-01_task-rest_run-1_desc-confounds_timeseries.tsv",
                     "sub-02_task-rest_run-1_desc-confounds_regressors.tsv",
                     "sub-03_task-rest_run-1_desc-confounds_timeseries.tsv"]


def test_folders_that_hold_no_runs_are_not_walked_and_linked_ones_are(tmp_path):
    from neurox.io.bids import discover

    root = tmp_path / "fmriprep"
    bold = bids_run(root, "01", n_frames=8)
    for decoy in ("sourcedata/freesurfer/sub-02/func", "sub-01/figures", "fmriprep_23_1_wf/sub-03/func",
                  ".git/sub-04/func"):
        (root / decoy).mkdir(parents=True)
        (root / decoy / bold.name.replace("sub-01", f"sub-0{decoy.split('sub-0')[-1][0]}")).write_bytes(b"")
    bids_run(tmp_path / "elsewhere", "05", n_frames=8)
    (root / "sub-05").symlink_to(tmp_path / "elsewhere" / "sub-05")  # a cohort put together from links
    (root / "sub-05" / "func" / "up").symlink_to(root)  # a link to a folder above: no loop, no run twice
    assert [spec.run_id for spec in discover(root)] == ["sub-01_task-rest_run-1", "sub-05_task-rest_run-1"]


def test_a_pediatric_templates_cohorts_are_templates_of_their_own(tmp_path, capsys):
    """fMRIPrep names MNIPediatricAsym's age ranges with a cohort- entity (space-MNIPediatricAsym_cohort-2_res-2):
    each is a template of its own, the --space fMRIPrep's --output-spaces gives it names one, and the run's
    confounds table (in no space) is found beside it."""
    root = tmp_path / "fmriprep"
    for cohort in ("1", "2"):
        bold = bids_run(root, "01", n_frames=8, space=f"MNIPediatricAsym_cohort-{cohort}")
    (bold.parent / "sub-01_task-rest_run-1_desc-confounds_timeseries.tsv").write_text("csf\n" + "1\n" * 8)
    args = ["prepare", str(root), "--out", str(tmp_path / "store"), "--voxel_size", "4", "--min_frames", "8",
            "--quiet", "true"]
    assert main(args) == 1
    assert ("in several MNI output spaces (MNIPediatricAsym:cohort-1:res-4, MNIPediatricAsym:cohort-2:res-4)"
            in capsys.readouterr().err)
    assert main([*args, "--space", "MNIPediatricAsym:cohort-2"]) == 0
    store = Store(tmp_path / "store")
    assert store.info["space"] == "MNIPediatricAsym:cohort-2"
    assert "csf" in store.run(store.run_ids[0]).confounds()


def test_runs_in_several_output_spaces_are_chosen_with_space(tmp_path, capsys):
    """fMRIPrep writes a run once per output space (its --cifti-output adds MNI152NLin6Asym at 2 mm): the choice
    is never made silently, and --space makes it, by the space's name or with its resolution."""
    root = tmp_path / "fmriprep"
    bids_run(root, "01", seed=1)
    six = bids_run(root, "01", seed=2, space="MNI152NLin6Asym")
    for path in list(six.parent.glob("*MNI152NLin6Asym_res-4*")):  # the same space at a second resolution
        path.with_name(path.name.replace("res-4", "res-2")).write_bytes(path.read_bytes())
        # and at the BOLD's own voxel size, which fMRIPrep names without a res- entity
        path.with_name(path.name.replace("_res-4", "")).write_bytes(path.read_bytes())
    bids_run(root, "01", seed=3, space="T1w")  # never taken
    store = tmp_path / "store"
    args = ["prepare", str(root), "--out", str(store), "--voxel_size", "4", "--quiet", "true"]
    for space, said in ((None, "sub-01_task-rest_run-1 is in several MNI output spaces (MNI152NLin2009cAsym:res-4, "
                                "MNI152NLin6Asym, MNI152NLin6Asym:res-2, MNI152NLin6Asym:res-4); choose one with "
                                "--space, e.g. --space MNI152NLin2009cAsym:res-4"),
                        ("MNI152NLin6Asym:res-1", "no runs in space MNI152NLin6Asym:res-1 (found: "
                                                  "MNI152NLin2009cAsym:res-4, MNI152NLin6Asym, MNI152NLin6Asym:res-2, "
                                                  "MNI152NLin6Asym:res-4)"),
                        ("T1w", "--space T1w: models read runs in an MNI space")):
        assert main(args + (["--space", space] if space else [])) == 1
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert not store.exists()  # nothing was begun
    assert main([*args, "--space", "MNI152NLin6Asym:res-4"]) == 0
    (run_id,) = Store(store).run_ids
    assert Store(store).run(run_id).attributes["source"]["path"] == str(six)
    # the template alone: the run written without a res- entity
    assert main([*args[:3], str(tmp_path / "native"), *args[4:], "--space", "MNI152NLin6Asym"]) == 0
    (run_id,) = Store(tmp_path / "native").run_ids
    assert Store(tmp_path / "native").run(run_id).attributes["source"]["path"] == str(six).replace("_res-4", "")


def test_the_phenotype_table_of_the_bids_dataset_above_fmripreps_outputs_is_found(tmp_path, capsys):
    """fMRIPrep does not copy participants.tsv into its outputs: bids/derivatives/fmriprep reads the raw
    dataset's; where there is none, prepare says so and how to give one."""
    fmriprep = tmp_path / "bids" / "derivatives" / "fmriprep"
    bids_run(fmriprep, "01", n_frames=20)
    args = ["prepare", str(fmriprep), "--out", str(tmp_path / "store"), "--voxel_size", "4", "--quiet", "true"]
    assert main(args) == 0
    assert "no phenotype table (participants.tsv) in the input folder or its BIDS dataset: give one with " \
           "--participants" in capsys.readouterr().out
    (tmp_path / "bids" / "participants.tsv").write_text("participant_id\tage\nsub-01\t31\n")
    assert main(args) == 0  # the re-run adds the table and keeps the run
    said = capsys.readouterr().out
    assert "0 prepared, 1 already done" in said and "1 of 1 participants with runs have a row" in said
    assert [row["age"] for row in Store(tmp_path / "store").phenotypes()] == ["31"]
    (tmp_path / "bids" / "participants.tsv").unlink()
    assert main(args) == 0 and "no phenotype table" not in capsys.readouterr().out  # the store keeps the one it has
    assert [row["age"] for row in Store(tmp_path / "store").phenotypes()] == ["31"]


def test_single_nifti_with_computed_mask(tmp_path):
    path = save(tmp_path / "run.nii.gz", bold())
    assert prepare(path, tmp_path / "store", OPTIONS, progress=False).ok
    store = Store(tmp_path / "store")
    (run_id,) = store.run_ids
    assert store.run(run_id).attributes["mask_source"] == "computed"
    # the computed mask is the blob, landed on the target grid at the right place
    expected = np.zeros((48, 48, 48), bool)
    expected[4:44, 0:47, 6:46] = brain_mask()[:, 1:, :]  # source voxel 0 sits at target (4, -1, 6)
    assert np.array_equal(store.mask(run_id), expected)


def test_the_tr_is_read_in_seconds_whatever_unit_the_header_gives(tmp_path, capsys):
    def run_with_header_tr(name: str, tr: float, unit: str) -> Path:
        path = save(tmp_path / name, bold())
        img = nib.load(path)
        img.header.set_xyzt_units("mm", unit)
        img.header.set_zooms((4.0, 4.0, 4.0, tr))
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header), path)
        return path

    def stored_tr(path: Path, store: str, **options) -> float:
        report = prepare(path, tmp_path / store, replace(OPTIONS, **options), progress=False)
        assert report.ok, report.failed
        (run_id,) = Store(tmp_path / store).run_ids
        return Store(tmp_path / store).run(run_id).attributes["tr"]

    assert stored_tr(run_with_header_tr("ms.nii.gz", 720.0, "msec"), "ms") == pytest.approx(0.72)
    # 720 with the unit unset is no TR in seconds: refused, unless --tr gives it
    unset = run_with_header_tr("unset.nii.gz", 720.0, "unknown")
    report = prepare(unset, tmp_path / "refused", OPTIONS, progress=False)
    (error,) = report.failed.values()
    assert error == f"{unset}: the header's TR, 720, is not seconds (its time unit unset or wrong?); give the TR " \
                    "in seconds with --tr"
    assert stored_tr(unset, "given", tr=0.72) == pytest.approx(0.72)
    # the dry run says the same
    assert main(["prepare", str(unset), "--out", str(tmp_path / "dry"), "--voxel_size", "4", "--min_frames", "8",
                 "--dry_run", "true", "--quiet", "true"]) == 0
    assert f"would fail, no TR in seconds: {error}" in capsys.readouterr().out


def test_nan_outside_the_brain_is_background(tmp_path):
    data = bold()  # 0 outside the brain
    zeros = save(tmp_path / "zeros.nii.gz", data)
    data[~brain_mask()] = np.nan  # as SPM writes it
    nans = save(tmp_path / "nans.nii.gz", data)
    stores = []
    for path in (zeros, nans):
        assert prepare(path, tmp_path / path.name.split(".")[0], OPTIONS, progress=False).ok
        stores.append(Store(tmp_path / path.name.split(".")[0]))
    (a, b), (run_a, run_b) = stores, [s.run(s.run_ids[0]) for s in stores]
    assert np.array_equal(a.mask(a.run_ids[0]), b.mask(b.run_ids[0]))
    assert np.array_equal(run_a.read(0, 24), run_b.read(0, 24))
    assert run_a.attributes["normalization"] == run_b.attributes["normalization"]
    data[10, 20, 20, 5] = np.nan  # inside the brain: no background
    report = prepare(save(tmp_path / "hole.nii.gz", data), tmp_path / "hole", OPTIONS, progress=False)
    assert list(report.failed.values()) == [f"{tmp_path / 'hole.nii.gz'}: NaN or Inf values (first in frame 5)"]


def test_tsv_manifest(tmp_path):
    save(tmp_path / "in" / "a.nii.gz", bold(seed=1))
    b = save(tmp_path / "in" / "b.nii.gz", bold(seed=2))
    m = save(tmp_path / "in" / "mask.nii.gz", brain_mask().astype(np.uint8))
    (tmp_path / "in" / "runs.tsv").write_text(
        f"participant_id\tsession\tpath\tmask\nsub-x\t1\ta.nii.gz\tmask.nii.gz\nsub-x\t2\t{b}\t{m}\n")
    assert prepare(tmp_path / "in" / "runs.tsv", tmp_path / "store", OPTIONS, progress=False).ok
    rows = Store(tmp_path / "store").manifest
    assert [(r["participant_id"], r["session"], r["run_id"]) for r in rows] == [
        ("sub-x", "1", "sub-x_ses-1"), ("sub-x", "2", "sub-x_ses-2")]


def test_store_is_readable_by_zarr(cohort, tmp_path):
    prepare(cohort, tmp_path / "store", OPTIONS, progress=False)
    store = Store(tmp_path / "store")
    run_id = store.run_ids[0]
    array = zarr.open_array(str(tmp_path / "store" / "runs" / f"{run_id}.zarr"), mode="r")
    assert array.shape == (24, 48, 48, 48) and array.dtype == np.float16
    assert np.array_equal(array[5:15], store.run(run_id).read(5, 10))
    assert array.attrs["run_id"] == run_id


# --- normalisation -----------------------------------------------------------------------------


def test_global_zscore_is_the_published_recipe(tmp_path):
    path = save(tmp_path / "run.nii.gz", bold())
    prepare(path, tmp_path / "store", OPTIONS, progress=False)
    store = Store(tmp_path / "store")
    run_id = store.run_ids[0]
    data = store.run(run_id).read(0, 24).astype(np.float64)
    mask = store.mask(run_id)
    inside = data[:, mask]
    assert abs(inside.mean()) < 1e-2 and abs(inside.std() - 1) < 1e-2
    # background filled with the minimum of the normalised brain
    assert np.all(data[:, ~mask] == data[:, mask].min())
    stats = store.run(run_id).attributes["normalization"]
    raw = bold()[brain_mask()]
    assert stats["mean"] == pytest.approx(raw.mean(), rel=1e-6)
    assert stats["std"] == pytest.approx(raw.std(), rel=1e-4)


def test_voxel_zscore(tmp_path):
    path = save(tmp_path / "run.nii.gz", bold())
    prepare(path, tmp_path / "store", replace(OPTIONS, normalization="voxel_zscore"), progress=False)
    store = Store(tmp_path / "store")
    run_id = store.run_ids[0]
    data = store.run(run_id).read(0, 24).astype(np.float64)
    mask = store.mask(run_id)
    assert np.abs(data[:, mask].mean(0)).max() < 1e-2
    assert np.abs(data[:, mask].std(0) - 1).max() < 1e-2
    assert np.all(data[:, ~mask] == 0)


# --- bad inputs --------------------------------------------------------------------------------


def bad_inputs(root: Path) -> dict[str, str]:
    """One broken run of each kind beside the good ones; the expected error text for each."""
    broken = {}
    path = bids_run(root, "b1")
    save(path, bold()[..., 0])
    broken["sub-b1"] = "3D image"
    data = bold()
    data[10, 10, 10, 7] = np.nan
    bids_run(root, "b2", data=data)
    broken["sub-b2"] = "NaN or Inf values (first in frame 7)"
    bids_run(root, "b3", mask=brain_mask()[:-1])
    broken["sub-b3"] = "do not match the run"
    bids_run(root, "b4", n_frames=5)
    broken["sub-b4"] = "5 frames, fewer than one window (8)"
    truncate_gzip(bids_run(root, "b5"))
    broken["sub-b5"] = "corrupt or truncated"
    path = bids_run(root, "b6")
    path.write_bytes(b"this is not a nifti file at all" * 20)
    broken["sub-b6"] = "not a readable NIfTI"
    # MNI-named but not in MNI space: the brain is 60 mm off where MNI brains are
    shifted = AFFINE.copy()
    shifted[:3, 3] += [60.0, 0.0, 0.0]
    path = bids_run(root, "b7")
    save(path, bold(), shifted)
    save(Path(str(path).replace("desc-preproc_bold", "desc-brain_mask")), brain_mask().astype(np.uint8), shifted)
    broken["sub-b7"] = "not in MNI space"
    # the mask's affine does not match the run's
    path = bids_run(root, "b8")
    save(Path(str(path).replace("desc-preproc_bold", "desc-brain_mask")), brain_mask().astype(np.uint8),
         AFFINE @ np.diag([1.0, 1.0, 1.0, 1.0]) + np.array([[0, 0, 0, 4.0], [0] * 4, [0] * 4, [0] * 4]))
    broken["sub-b8"] = "do not match the run"
    path = bids_run(root, "b9")
    path.with_name(path.name.replace(".nii.gz", ".json")).write_text('{"RepetitionTime": 2000}')
    broken["sub-b9"] = "RepetitionTime 2000 is not a TR in seconds"
    return broken


def test_bad_inputs_fail_alone_with_a_clear_line(cohort, tmp_path, capsys):
    broken = bad_inputs(cohort)
    code = main(["prepare", str(cohort), "--out", str(tmp_path / "store"), "--voxel_size", "4",
                 "--min_frames", "8", "--quiet", "true"])
    assert code == 3
    err = capsys.readouterr().err
    store = Store(tmp_path / "store")
    assert len(store.run_ids) == 3  # the good runs are done
    failures = {row["participant_id"]: row for row in read_tsv(tmp_path / "store" / "failures.tsv")}
    assert set(failures) == set(broken)
    for participant, expected in broken.items():
        error = failures[participant]["error"]
        assert expected in error, (participant, error)
        assert error.startswith(str(cohort)), error  # names the file
        assert "\n" not in error
        assert f"failed: {error}" in err
    # nothing half-written: only finished runs and failure markers in runs/
    names = sorted(p.name for p in (tmp_path / "store" / "runs").iterdir())
    assert not [n for n in names if n.startswith(".tmp")]
    assert len([n for n in names if n.endswith(".zarr")]) == 3
    statuses = [row["status"] for row in store.manifest]
    assert statuses.count("ok") == 3 and statuses.count("failed") == len(broken)


def test_a_fixed_run_is_taken_on_the_next_pass(tmp_path):
    root = tmp_path / "d"
    bids_run(root, "01")
    path = bids_run(root, "02", n_frames=5)
    assert not prepare(root, tmp_path / "store", OPTIONS, progress=False).ok
    bids_run(root, "02", n_frames=24)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    report = prepare(root, tmp_path / "store", OPTIONS, progress=False)
    assert report.ok and report.done == ["sub-02_task-rest_run-1"] and report.skipped == ["sub-01_task-rest_run-1"]
    assert (tmp_path / "store" / "failures.tsv").read_text().count("\n") == 1  # header only


@pytest.mark.parametrize("fmt", ["zarr", "npy"])
def test_a_run_cut_short_in_the_store_is_said_and_redone_by_the_next_pass(tmp_path, fmt):
    root, store = tmp_path / "d", tmp_path / "store"
    bids_run(root, "01")
    bids_run(root, "02", seed=1)
    assert prepare(root, store, OPTIONS, fmt=fmt, progress=False).ok
    reference = Store(store).read_frames("sub-02_task-rest_run-1", 0, 24)
    damaged = store / "runs" / f"sub-02_task-rest_run-1.{fmt}" / ("c/0/0/0/0" if fmt == "zarr" else "data.npy")
    damaged.write_bytes(damaged.read_bytes()[:-200])  # a copy or a disk that ran out part-way
    with pytest.raises(UnreadableRun, match=f"^{damaged}: .* run neurox prepare into this store again to redo it$"):
        Store(store).read_frames("sub-02_task-rest_run-1", 0, 24)
    report = prepare(root, store, OPTIONS, fmt=fmt, progress=False)
    assert report.ok and report.done == ["sub-02_task-rest_run-1"] and report.skipped == ["sub-01_task-rest_run-1"]
    np.testing.assert_array_equal(Store(store).read_frames("sub-02_task-rest_run-1", 0, 24), reference)


def test_inputs_are_never_modified(cohort, tmp_path):
    before = {p: p.read_bytes() for p in cohort.rglob("*") if p.is_file()}
    prepare(cohort, tmp_path / "store", OPTIONS, progress=False)
    assert before == {p: p.read_bytes() for p in cohort.rglob("*") if p.is_file()}


# --- resume, parallelism, orientation -----------------------------------------------------------


def test_killed_then_resumed_equals_uninterrupted(tmp_path):
    root = tmp_path / "d"
    for i in range(4):
        bids_run(root, f"0{i}", n_frames=160, seed=i)
    prepare(root, tmp_path / "reference", OPTIONS, progress=False)

    args = [sys.executable, "-m", "neurox.cli", "prepare", str(root), "--out", str(tmp_path / "store"),
            "--voxel_size", "4", "--min_frames", "8", "--quiet", "true"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = tmp_path / "store" / "runs"
    caught_mid_run = False
    deadline = time.time() + 60
    while process.poll() is None and time.time() < deadline:
        if runs.is_dir() and any(runs.glob("*.zarr")) and any(runs.glob(".tmp-*")):
            process.send_signal(signal.SIGKILL)
            caught_mid_run = True
            break
        time.sleep(0.002)
    process.wait()
    assert caught_mid_run, "the process finished before it could be killed mid-run"
    assert any(runs.glob(".tmp-*"))  # it really died half-way through a run

    report = prepare(root, tmp_path / "store", OPTIONS, progress=False)
    assert report.ok and report.skipped  # finished runs were not redone
    assert not any(runs.glob(".tmp-*"))
    assert_same_store(tmp_path / "store", tmp_path / "reference")


def test_workers_and_shards_give_the_same_store(cohort, tmp_path):
    prepare(cohort, tmp_path / "serial", OPTIONS, progress=False)
    prepare(cohort, tmp_path / "parallel", OPTIONS, workers=2, progress=False)
    assert_same_store(tmp_path / "serial", tmp_path / "parallel")
    for i in range(2):
        prepare(cohort, tmp_path / "sharded", OPTIONS, shard=(i, 2), progress=False)
    assert_same_store(tmp_path / "serial", tmp_path / "sharded")
    assert len(Store(tmp_path / "sharded").manifest) == 3
    # the shards of an array job rebuild the manifest one at a time: one waits while another holds the store
    (tmp_path / "sharded" / "manifest.tsv").unlink()
    with open(tmp_path / "sharded" / LOCK_FILE, "a") as other_shard:
        fcntl.flock(other_shard, fcntl.LOCK_EX)
        waiting = threading.Thread(target=write_manifest, args=(tmp_path / "sharded", "zarr"))
        waiting.start()
        waiting.join(timeout=0.5)
        assert waiting.is_alive() and not (tmp_path / "sharded" / "manifest.tsv").exists()
    waiting.join(timeout=30)
    assert len(Store(tmp_path / "sharded").manifest) == 3


def test_a_cohorts_rerun_lists_the_store_once_for_half_written_runs(tmp_path):
    bids_run(tmp_path / "in", "01")
    bids_run(tmp_path / "in", "02")
    assert prepare(tmp_path / "in", tmp_path / "store", OPTIONS, progress=False).ok
    runs = tmp_path / "store" / "runs"
    for name in ("sub-01_task-rest_run-1-4242", "sub-02_task-rest_run-1-77", "sub-02_task-rest_run-1-78"):
        (runs / f".tmp-{name}" / "c").mkdir(parents=True)  # what a killed job leaves
    assert {run_id: sorted(paths) for run_id, paths in unfinished_runs(tmp_path / "store").items()} == {
        "sub-01_task-rest_run-1": [runs / ".tmp-sub-01_task-rest_run-1-4242"],
        "sub-02_task-rest_run-1": [runs / ".tmp-sub-02_task-rest_run-1-77", runs / ".tmp-sub-02_task-rest_run-1-78"]}
    # a shard clears its own runs' leftovers only: another shard may be writing its own
    assert prepare(tmp_path / "in", tmp_path / "store", OPTIONS, shard=(1, 2), progress=False).skipped == [
        "sub-02_task-rest_run-1"]
    assert sorted(p.name for p in runs.glob(".tmp-*")) == [".tmp-sub-01_task-rest_run-1-4242"]


def test_las_input_equals_its_ras_twin(tmp_path):
    ras = save(tmp_path / "ras" / "run.nii.gz", bold())
    las = as_las(ras, tmp_path / "las" / "run.nii.gz")
    assert nib.aff2axcodes(nib.load(str(las)).affine) == ("L", "A", "S")
    prepare(ras, tmp_path / "store_ras", OPTIONS, progress=False)
    prepare(las, tmp_path / "store_las", OPTIONS, progress=False)
    a, b = store_contents(tmp_path / "store_ras"), store_contents(tmp_path / "store_las")
    (ka,), (kb,) = a, b
    assert np.array_equal(a[ka][0], b[kb][0])
    attrs_a, attrs_b = json.loads(a[ka][1]), json.loads(b[kb][1])
    for key in ("mask", "normalization", "affine", "crop_box_mm"):
        assert attrs_a[key] == attrs_b[key]


def test_npy_backend_reads_the_same_windows(cohort, tmp_path):
    prepare(cohort, tmp_path / "zarr", OPTIONS, progress=False)
    prepare(cohort, tmp_path / "npy", OPTIONS, fmt="npy", progress=False)
    a, b = Store(tmp_path / "zarr"), Store(tmp_path / "npy")
    for run_id in a.run_ids:
        assert np.array_equal(a.read_window(run_id, 3, 10), b.read_window(run_id, 3, 10))


def test_resampling_only_when_asked(tmp_path):
    path = save(tmp_path / "run.nii.gz", bold())
    two_mm = replace(OPTIONS, grid=type(OPTIONS.grid).default(2.0))
    report = prepare(path, tmp_path / "refused", two_mm, progress=False)
    assert "does not align with the 2.0 mm target grid; pass --resample" in report.failed["run"]
    assert prepare(path, tmp_path / "store", replace(two_mm, resample=True), progress=False).ok
    assert Store(tmp_path / "store").read_window("run", 0, 8).shape == (1, 96, 96, 96, 8)


def test_a_coarser_grid_averages_the_voxels_it_covers(tmp_path):
    """2 mm noise onto the 4 mm grid: each 4 mm voxel is the mean over its extent ([0.25, 0.5, 0.25] on each axis
    of the 2 mm voxels around its centre), not a sample of one voxel, whose noise would pass through whole."""
    from neurox.data.grid import GridMapping
    from neurox.io.nifti import read_info

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = AFFINE[:3, 3]  # 4 mm voxel centres fall on 2 mm ones
    noise = np.random.default_rng(0).standard_normal((80, 96, 80, 2)).astype(np.float32)
    # no interpolation, so no --resample needed
    mapping = GridMapping(read_info(save(tmp_path / "run.nii.gz", noise, affine)), OPTIONS.grid, resample=False)
    out = mapping(noise)
    assert out.shape == (48, 48, 48, 2) and out.dtype == np.float32
    i, j, k = 20, 24, 30  # an inside voxel of the target, at 2 mm voxel (2i - 8, 2j + 2, 2k - 12)
    x, y, z = np.round(np.linalg.inv(affine) @ OPTIONS.grid.affine @ [i, j, k, 1])[:3].astype(int)
    tent = np.array([0.25, 0.5, 0.25])
    cube = noise[x - 1 : x + 2, y - 1 : y + 2, z - 1 : z + 2, 0]
    assert out[i, j, k, 0] == pytest.approx(np.einsum("xyz,x,y,z->", cube, tent, tent, tent), abs=1e-5)
    inside = out[10:38, 10:38, 10:38]
    assert inside.var() == pytest.approx(np.sum(tent**2) ** 3, rel=0.1)  # a sample would keep variance 1
    assert mapping(np.ones((80, 96, 80), np.uint8), nearest=True)[i, j, k] == 1  # masks: nearest, unaveraged
    two_mm = bold(8)
    for axis in range(3):
        two_mm = np.repeat(two_mm, 2, axis=axis)
    brain = save(tmp_path / "brain.nii.gz", two_mm, affine)
    survey = prepare(brain, tmp_path / "store", OPTIONS, progress=False, dry_run=True).survey
    assert "grid: 2x2x2 mm, averaged onto the 4 mm target box (1 run(s))" in survey
    report = prepare(brain, tmp_path / "store", OPTIONS, progress=False)
    assert report.ok and Store(tmp_path / "store").run("brain").attributes["source"]["resampled"]
    assert not mapping.interpolates
    mapping.separable = False  # scipy's 3D interpolation, which an oblique input takes, gives the same
    assert np.abs(mapping(noise) - out).max() < 1e-5
    assert np.array_equal(mapping(noise, fill=-7.0) == -7.0, out == 0.0)  # the same voxels outside the input


def test_a_native_resolution_run_is_interpolated_one_axis_at_a_time_as_in_3d(tmp_path):
    """fMRIPrep's default MNI output keeps the BOLD's voxel size (3 mm here) and lands off the box's centres:
    trilinear, one axis at a time, gives scipy's 3D interpolation (and its nearest voxel, for masks)."""
    from neurox.data.grid import GridMapping
    from neurox.io.nifti import read_info

    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = (-91.0, -125.5, -73.0)
    run = np.random.default_rng(1).standard_normal((61, 73, 61, 3)).astype(np.float32)
    path = save(tmp_path / "run.nii.gz", run, affine)
    two_mm = type(OPTIONS.grid).default(2.0)
    with pytest.raises(InputError, match="pass --resample to interpolate"):
        GridMapping(read_info(path), two_mm, resample=False)
    mapping = GridMapping(read_info(path), two_mm, resample=True)
    mask = (run[..., 0] > 0).astype(np.uint8)
    by_axis = mapping(run, fill=-9.0), mapping(mask, nearest=True)
    assert by_axis[0].shape == (96, 96, 96, 3) and by_axis[0].flags["F_CONTIGUOUS"] and by_axis[1].dtype == np.uint8
    mapping.separable = False
    in_3d = mapping(run, fill=-9.0), mapping(mask, nearest=True)
    assert np.abs(by_axis[0] - in_3d[0]).max() < 1e-5 and np.array_equal(by_axis[1], in_3d[1])


def test_like_applies_a_models_input_contract(tmp_path):
    from neurox.cli import main as cli

    assert cli(["smoke", "--preset", "demo", "--out", str(tmp_path / "model")]) == 0
    path = save(tmp_path / "run.nii.gz", bold())
    assert cli(["prepare", str(path), "--out", str(tmp_path / "store"), "--like", str(tmp_path / "model"),
                "--quiet", "true"]) == 0
    info = Store(tmp_path / "store").info
    assert info["grid"] == [48, 48, 48] and info["voxel_size_mm"] == 4.0  # the demo model's 4 mm grid


def test_a_model_records_its_stores_template_and_like_takes_it(tmp_path, capsys):
    """A store keeps the MNI template its files name, a model trained on it records it, and prepare --like takes
    that template from a folder holding several, and warns of another; a store never mixes two."""
    from neurox.config import InputContract, preset
    from neurox.hub import save_pretrained
    from neurox.models import SwiFT
    from neurox.train.runs import check_contract, store_contract

    both, only_2009c, mixed = tmp_path / "both", tmp_path / "only-2009c", tmp_path / "mixed"
    for sub in ("01", "02"):
        for space in ("MNI152NLin2009cAsym", "MNI152NLin6Asym"):
            bids_run(both, sub, n_frames=20, space=space)
    bids_run(only_2009c, "03", n_frames=20)
    bids_run(mixed, "04", n_frames=20)
    bids_run(mixed, "05", n_frames=20, space="MNI152NLin6Asym")

    def run(*args: str) -> tuple[int, str]:
        code = main(["prepare", *args, "--voxel_size", "4", "--quiet", "true"])
        return code, capsys.readouterr().err

    assert run(str(both), "--out", str(tmp_path / "store-6"), "--space", "MNI152NLin6Asym")[0] == 0
    store = Store(tmp_path / "store-6")
    assert store.info["space"] == "MNI152NLin6Asym"
    contract = InputContract.for_model(preset("demo"), **store_contract(store.info))
    assert contract.space == "MNI152NLin6Asym"
    save_pretrained(SwiFT(preset("demo")), tmp_path / "model", contract=contract)
    like = ("--like", str(tmp_path / "model"))
    assert run(str(both), "--out", str(tmp_path / "again"), *like)[0] == 0  # no --space needed: the model's
    again = Store(tmp_path / "again")
    assert again.info["space"] == "MNI152NLin6Asym" and len(again.manifest) == 2
    assert all("_space-MNI152NLin6Asym_" in row["source"] for row in again.manifest)
    code, err = run(str(only_2009c), "--out", str(tmp_path / "other"), *like)
    assert code == 0 and "warning: the model was trained on runs in MNI152NLin6Asym and these are in " \
                          "MNI152NLin2009cAsym" in err
    check_contract(contract, Store(tmp_path / "other"), "the model")
    said = capsys.readouterr().err
    assert "holds runs in MNI152NLin2009cAsym: the templates place the brain millimetres apart" in said
    code, err = run(str(only_2009c), "--out", str(tmp_path / "store-6"))
    assert code == 1 and "this store holds runs in MNI152NLin6Asym, and these are in MNI152NLin2009cAsym" in err
    code, err = run(str(mixed), "--out", str(tmp_path / "mixed-store"))
    assert code == 1 and "runs in several MNI templates (MNI152NLin2009cAsym, MNI152NLin6Asym); a store holds " \
                         "one" in err


def test_another_pipelines_denoised_runs_are_read_with_desc_and_recorded(tmp_path, capsys):
    """fMRIPrep 20.2's ICA-AROMA output beside its preprocessed runs: --desc chooses it, the store and a model's
    contract record it, --like reads it again, and a folder holding only it says so."""
    from neurox.config import InputContract, preset
    from neurox.hub import save_pretrained
    from neurox.models import SwiFT
    from neurox.train.runs import check_contract, store_contract

    both, aroma_only = tmp_path / "fmriprep", tmp_path / "aroma-only"
    for root in (both, aroma_only):
        func = root / "sub-01" / "func"
        aroma = save(func / "sub-01_task-rest_run-1_space-MNI152NLin6Asym_desc-smoothAROMAnonaggr_bold.nii.gz",
                     bold(20, seed=7))
        aroma.with_name(aroma.name.replace(".nii.gz", ".json")).write_text('{"RepetitionTime": 2.0}')
        (func / "sub-01_task-rest_run-1_desc-confounds_timeseries.tsv").write_text("csf\n" + "1\n" * 20)
    bids_run(both, "01", n_frames=20)  # its desc-preproc run, in MNI152NLin2009cAsym

    def run(*args: str) -> tuple[int, str]:
        code = main(["prepare", *args, "--voxel_size", "4", "--min_frames", "8", "--quiet", "true"])
        return code, capsys.readouterr().err

    assert run(str(both), "--out", str(tmp_path / "preproc"))[0] == 0
    assert "_desc-preproc_bold" in Store(tmp_path / "preproc").manifest[0]["source"]
    assert run(str(both), "--out", str(tmp_path / "aroma"), "--desc", "smoothAROMAnonaggr")[0] == 0
    store = Store(tmp_path / "aroma")
    (row,) = store.manifest
    assert "_desc-smoothAROMAnonaggr_bold" in row["source"] and store.info["space"] == "MNI152NLin6Asym"
    assert store.info["bold_desc"] == "smoothAROMAnonaggr" and Store(tmp_path / "preproc").info["bold_desc"] == \
        "preproc"
    assert store.run(row["run_id"]).confounds() is not None  # the run's table, named without space or desc
    code, err = run(str(both), "--out", str(tmp_path / "aroma"))
    assert code == 1 and "prepared with bold_desc=smoothAROMAnonaggr (--desc), not preproc" in err
    code, err = run(str(aroma_only), "--out", str(tmp_path / "none"))
    assert code == 1 and err.rstrip().endswith("found under this folder; found desc-smoothAROMAnonaggr runs: choose "
                                               "with --desc smoothAROMAnonaggr")
    contract = InputContract.for_model(preset("demo"), **store_contract(store.info))
    assert contract.bold_desc == "smoothAROMAnonaggr"
    save_pretrained(SwiFT(preset("demo")), tmp_path / "model", contract=contract)
    assert run(str(both), "--out", str(tmp_path / "like"), "--like", str(tmp_path / "model"))[0] == 0
    assert "_desc-smoothAROMAnonaggr_bold" in Store(tmp_path / "like").manifest[0]["source"]
    check_contract(contract, Store(tmp_path / "preproc"), "the model")
    assert f"trained on desc-smoothAROMAnonaggr runs and the store {tmp_path / 'preproc'} holds desc-preproc runs" \
        in capsys.readouterr().err
    assert run(str(both), "--out", str(tmp_path / "bad"), "--desc", "smooth-AROMA")[1].endswith(
        "--desc smooth-AROMA: a BIDS desc label, letters and digits (preproc, smoothAROMAnonaggr)\n")


def test_a_model_records_its_stores_grid_and_like_reproduces_it(tmp_path):
    from neurox.config import InputContract, preset
    from neurox.hub import save_pretrained
    from neurox.models import SwiFT
    from neurox.train.runs import check_contract, store_contract

    # 48^3 voxels of 2 mm: half the default box, which a 48^3 model's defaults would call 4 mm
    path = save(tmp_path / "run.nii.gz", bold())
    small = replace(OPTIONS, grid=TargetGrid((48, 48, 48), 2.0, (-48.0, -72.0, -30.0)), resample=True)
    assert prepare(path, tmp_path / "store", small, progress=False).ok
    store = Store(tmp_path / "store")
    arch = preset("demo")
    with pytest.raises(ValueError, match="expects input of voxel size 4.0, but the store .* has 2.0"):
        check_contract(InputContract.for_model(arch), store, "a default contract")
    contract = InputContract.for_model(arch, **store_contract(store.info))
    check_contract(contract, store, "the store's own contract")
    save_pretrained(SwiFT(arch), tmp_path / "model", contract=contract)
    options = options_from_model(tmp_path / "model", resample=True)
    assert prepare(path, tmp_path / "again", options, progress=False).ok
    assert {k: Store(tmp_path / "again").info[k] for k in ("grid", "voxel_size_mm", "origin_mm")} == {
        k: store.info[k] for k in ("grid", "voxel_size_mm", "origin_mm")}


def test_voxel_center_keeps_relative_amplitude(tmp_path):
    data = bold()
    region = data[10:20]
    data[10:20] = np.where(region > 0, 1000 + (region - 1000) * 2.0, 0.0)  # a region fluctuating twice as much
    path = save(tmp_path / "run.nii.gz", data)
    prepare(path, tmp_path / "store", replace(OPTIONS, normalization="voxel_center"), progress=False)
    store = Store(tmp_path / "store")
    run_id = store.run_ids[0]
    z = store.run(run_id).read(0, 24).astype(np.float64)
    mask = store.mask(run_id)
    assert np.abs(z[:, mask].mean(0)).max() < 1e-2  # the static anatomy is gone
    assert np.sqrt((z[:, mask].var(0)).mean()) == pytest.approx(1.0, abs=1e-2)
    assert np.all(z[:, ~mask] == 0)
    loud, quiet = z[:, 14:24][:, mask[14:24]].std(0).mean(), z[:, 30:40][:, mask[30:40]].std(0).mean()
    assert loud / quiet == pytest.approx(2.0, rel=0.1)  # target x 14..23 holds source x 10..19


def test_a_dry_run_groups_the_runs_that_would_fail_by_reason(tmp_path, capsys):
    save(tmp_path / "short.nii.gz", bold(6))
    save(tmp_path / "volume.nii.gz", bold(1)[..., 0])
    save(tmp_path / "ok.nii.gz", bold(12))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    (tmp_path / "runs.tsv").write_text("participant_id\tpath\n" + "".join(
        f"sub-{name}\t{name}.nii.gz\n" for name in ("short", "volume", "ok", "broken")))
    assert main(["prepare", str(tmp_path / "runs.tsv"), "--out", str(tmp_path / "store"), "--voxel_size", "4",
                 "--min_frames", "8", "--dry_run", "true", "--quiet", "true"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "dry run (nothing written): 4 run(s) to prepare, 0 already in the store"
    assert "frames: 12 (1 run(s)); 6 (1 run(s))" in lines  # runs in the order of their ids
    assert "would fail, fewer than --min_frames 8 frames: sub-short" in lines
    assert "would fail, not 4D: sub-volume" in lines
    assert any(line.startswith("would fail, unreadable:") and "broken.nii.gz" in line for line in lines)
    assert not (tmp_path / "store").exists()


def test_worker_processes_run_linear_algebra_on_one_thread():
    """N workers on N cores with a BLAS thread per core each ran 2x slower than one worker (oversubscribed)."""
    import importlib
    import os

    import threadpoolctl

    from neurox.workers import process_pool

    with process_pool(1, importlib.import_module, ("numpy",)) as pool:
        assert pool.submit(os.getenv, "OPENBLAS_NUM_THREADS").result() == "1"
        pools = pool.submit(threadpoolctl.threadpool_info).result()
    assert any(p["user_api"] == "blas" for p in pools) and all(p["num_threads"] == 1 for p in pools)


def test_a_killed_worker_is_one_line_and_the_next_run_resumes(tmp_path):
    """A --workers process killed by the system (as the out-of-memory killer does) stops the command with one
    line saying what to do; the same command again finishes the store."""
    for i in range(6):
        bids_run(tmp_path / "in", f"{i:02d}", n_frames=60, seed=i)
    command = [sys.executable, "-m", "neurox.cli", "prepare", str(tmp_path / "in"), "--out", str(tmp_path / "store"),
               "--voxel_size", "4", "--workers", "2", "--quiet", "true"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def workers() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                status = (entry / "status").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if f"PPid:\t{job.pid}\n" in status and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                found.append(int(entry.name))
        return found

    def working() -> bool:  # a run being written: the worker is past its start-up, mid-job, as the OOM killer finds it
        return any((tmp_path / "store" / "runs").glob(".tmp-*")) if (tmp_path / "store" / "runs").is_dir() else False

    deadline = time.monotonic() + 60
    while not (workers() and working()) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert job.poll() is None, "the workers finished before one could be killed"
    os.kill(workers()[0], signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 1 and "a worker process ended abruptly" in err and "Traceback" not in err
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0
    assert len(Store(tmp_path / "store").run_ids) == 6
