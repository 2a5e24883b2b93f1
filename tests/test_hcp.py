"""``neurox prepare`` on HCP-pipeline folders, ``--task``, and phenotype tables as cohorts ship them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fakes import OPTIONS, bids_run, bold, brain_mask, save

from neurox.cli import main
from neurox.data.confounds import read_confounds, table_columns
from neurox.data.phenotypes import participant_label
from neurox.data.prepare import prepare
from neurox.data.store import Store, read_tsv
from neurox.io.bids import discover
from neurox.io.nifti import InputError

N_FRAMES = 24


def motion_parameters(n_frames: int, seed: int) -> np.ndarray:
    """HCP's 12 columns: translations (mm) and rotations (degrees), then their derivatives."""
    rng = np.random.default_rng(seed)
    parameters = np.cumsum(0.05 * rng.standard_normal((n_frames, 6)), axis=0)
    return np.column_stack([parameters, np.vstack([np.zeros((1, 6)), np.diff(parameters, axis=0)])])


def hcp_run(root: Path, subject: str, run: str, seed: int = 0, fix: bool = False, motion: bool = True) -> Path:
    folder = root / subject / "MNINonLinear" / "Results" / run
    path = save(folder / f"{run}.nii.gz", bold(N_FRAMES, seed))
    if fix:
        save(folder / f"{run}_hp2000_clean.nii.gz", bold(N_FRAMES, seed + 100))
    save(folder / "brainmask_fs.2.nii.gz", brain_mask().astype(np.uint8))
    if motion:  # HCP writes it with leading spaces and fixed-width columns
        np.savetxt(folder / "Movement_Regressors.txt", motion_parameters(N_FRAMES, seed), fmt="  %.6f")
    return path


@pytest.fixture
def hcp(tmp_path) -> Path:
    root = tmp_path / "HCP_1200"
    hcp_run(root, "100307", "rfMRI_REST1_LR", seed=1, fix=True)
    hcp_run(root, "100307", "tfMRI_WM_LR", seed=2)
    hcp_run(root, "100408", "rfMRI_REST1_LR", seed=3)
    (root / "100408" / "T1w").mkdir()  # the rest of an HCP subject is not looked into
    return root


def test_hcp_layout_is_found_with_tasks_runs_masks_and_motion(hcp):
    specs = discover(hcp)
    assert [(s.participant_id, s.task, s.run, s.run_id) for s in specs] == [
        ("sub-100307", "rest", "REST1_LR", "sub-100307_rfMRI_REST1_LR"),
        ("sub-100307", "wm", "WM_LR", "sub-100307_tfMRI_WM_LR"),
        ("sub-100408", "rest", "REST1_LR", "sub-100408_rfMRI_REST1_LR")]
    assert all(s.mask.name == "brainmask_fs.2.nii.gz" and s.confounds.name == "Movement_Regressors.txt"
               for s in specs)
    assert [s.run_id for s in discover(hcp, task="rest")] == ["sub-100307_rfMRI_REST1_LR", "sub-100408_rfMRI_REST1_LR"]
    (fix,) = discover(hcp, hcp_bold="fix")  # only one run was cleaned by ICA-FIX
    assert fix.bold.name == "rfMRI_REST1_LR_hp2000_clean.nii.gz" and fix.participant_id == "sub-100307"
    with pytest.raises(InputError, match=r"no runs of task 'motor' \(tasks found: rest, wm\)"):
        discover(hcp, task="motor")
    assert discover(hcp / "100408")[0].participant_id == "sub-100408"  # a subject folder given itself
    (hcp / "100408/MNINonLinear/Results/rfMRI_REST1_LR/rfMRI_REST1_LR_hp0_clean.nii.gz").write_bytes(b"")
    (other,) = discover(hcp, hcp_bold="_hp0_clean")  # another release's name for the cleaned run
    assert other.bold.name == "rfMRI_REST1_LR_hp0_clean.nii.gz" and other.participant_id == "sub-100408"
    with pytest.raises(ValueError, match="give minimal, fix, or a suffix"):
        discover(hcp, hcp_bold="clean")
    with pytest.raises(InputError, match="HCP-pipeline runs .*<run>_hp2000_clean.nii.gz"):
        discover(hcp / "100408", hcp_bold="fix")


def test_hcp_folders_inside_bids_names(tmp_path):
    hcp_run(tmp_path / "out" / "sub-NDARINV01" / "ses-baseline", "files", "task-rest_run-01")
    # <subject> is "files" here: the participant and session come from the BIDS folders above it
    (spec,) = discover(tmp_path / "out")
    assert (spec.participant_id, spec.session, spec.task, spec.run) == ("sub-NDARINV01", "baseline", "rest", "01")
    assert spec.run_id == "sub-NDARINV01_ses-baseline_task-rest_run-01"


def test_abcd_bids_pipeline_folders_number_their_runs(tmp_path):
    # the ABCD-BIDS (DCAN) pipeline: sub-*/ses-*/files/MNINonLinear/Results/task-rest01, task-rest02, task-MID01
    for run in ("task-rest01", "task-rest02", "task-MID01"):
        hcp_run(tmp_path / "abcd" / "sub-NDARINV01" / "ses-baselineYear1Arm1", "files", run)
    specs = discover(tmp_path / "abcd", task="rest")
    assert [(s.participant_id, s.session, s.task, s.run, s.run_id) for s in specs] == [
        ("sub-NDARINV01", "baselineYear1Arm1", "rest", run, f"sub-NDARINV01_ses-baselineYear1Arm1_task-rest{run}")
        for run in ("01", "02")]
    assert [s.task for s in discover(tmp_path / "abcd", task="MID")] == ["MID"]


def test_hcp_motion_becomes_fmriprep_columns(tmp_path):
    values = np.zeros((4, 12))
    values[2, 0] = 0.1  # 0.1 mm along x at frame 2
    values[3, 0] = 0.1
    values[3, 5] = 0.2  # then 0.2 degrees about z at frame 3
    path = tmp_path / "Movement_Regressors.txt"
    np.savetxt(path, values, fmt="  %.6f")
    table = read_confounds(path)
    assert len(table) == 6 * 4 + 1 and table_columns(path) == set(table)  # what a dry run expects of it
    assert np.allclose(table["rot_z"], [0, 0, 0, np.deg2rad(0.2)])
    assert np.isnan(table["trans_x_derivative1"][0]) and np.allclose(table["trans_x_derivative1"][1:], [0, 0.1, 0])
    assert np.allclose(table["rot_z_power2"], table["rot_z"] ** 2)
    fd = table["framewise_displacement"]
    assert np.isnan(fd[0]) and np.allclose(fd[1:], [0, 0.1, 50 * np.deg2rad(0.2)])  # 0.1745 mm of arc at 50 mm
    (tmp_path / "Movement_Regressors_bad.txt").write_text("1 2 3\n4 5 6\n")
    with pytest.raises(InputError, match="Movement_Regressors_bad.txt: expected 6 or 12 columns"):
        read_confounds(tmp_path / "Movement_Regressors_bad.txt")


def test_prepare_an_hcp_cohort_with_its_csv_phenotypes(hcp, tmp_path, capsys):
    # HCP's behavioural table: a .csv, ids as plain numbers in "Subject"; one participant has no runs
    (tmp_path / "unrestricted.csv").write_text("Subject,Gender,Age\n100307,F,26-30\n100408,M,31-35\n999999,F,22-25\n")
    assert main(["prepare", str(hcp), "--out", str(tmp_path / "store"), "--voxel_size", "4", "--min_frames", "8",
                 "--task", "rest", "--participants", str(tmp_path / "unrestricted.csv"), "--id_column", "Subject",
                 "--quiet", "true"]) == 0
    out = capsys.readouterr().out
    assert "phenotype table unrestricted.csv: 2 of 2 participants with runs have a row" in out
    assert "head motion of 2 run(s)" in out
    store = Store(tmp_path / "store")
    assert store.run_ids == ["sub-100307_rfMRI_REST1_LR", "sub-100408_rfMRI_REST1_LR"]
    row = store.manifest[0]
    assert (row["tr"], row["run"], row["shape"]) == ("2.0", "REST1_LR", "48x48x48x24")
    expected = read_confounds(hcp / "100307/MNINonLinear/Results/rfMRI_REST1_LR/Movement_Regressors.txt")
    assert float(row["mean_fd"]) == pytest.approx(np.nanmean(expected["framewise_displacement"]), abs=1e-4)
    assert store.run(row["run_id"]).attributes["mask_source"] == "given"
    phenotypes = {r["participant_id"]: r for r in store.phenotypes()}
    assert list(store.phenotypes()[0]) == ["participant_id", "Gender", "Age"]
    assert phenotypes["sub-100307"]["Gender"] == "F" and phenotypes["sub-999999"]["Age"] == "22-25"


def test_phenotype_ids_match_runs_with_or_without_the_sub_prefix(tmp_path):
    root = tmp_path / "derivatives"
    bids_run(root, "01", n_frames=12)
    bids_run(root, "02", n_frames=12, seed=1)
    (root / "participants.tsv").write_text("participant_id\tage\n01\t30\nsub_03\t50\n")
    report = prepare(root, tmp_path / "store", OPTIONS, progress=False)
    assert report.phenotypes == "phenotype table participants.tsv: 1 of 2 participants with runs have a row; " \
                                "none for sub-02"
    assert read_tsv(tmp_path / "store" / "participants.tsv") == [
        {"participant_id": "sub-01", "age": "30"}, {"participant_id": "sub-03", "age": "50"}]
    assert (root / "participants.tsv").read_text().startswith("participant_id\tage\n01\t")  # input untouched
    assert participant_label("sub-NDAR_INV01") == participant_label("NDARINV01") == "NDARINV01"


@pytest.mark.parametrize("table, message", [
    ("eid,age\n1,30\n", r"no participant_id column \(columns: eid, age\); name the column with --id_column"),
    ("participant_id\tage\nsub-01\t30\n01\t31\n", "'sub-01' and '01' name the same participant"),
])
def test_a_phenotype_table_that_cannot_be_joined_says_why(tmp_path, table, message):
    bids_run(tmp_path / "derivatives", "01", n_frames=12)
    path = tmp_path / ("pheno.csv" if "," in table else "pheno.tsv")
    path.write_text(table)
    with pytest.raises(InputError, match=message):
        prepare(tmp_path / "derivatives", tmp_path / "store", OPTIONS, participants=path, progress=False)
    assert not (tmp_path / "store").exists()  # checked before anything is written


def test_a_spreadsheets_semicolon_csv_is_read_with_its_decimal_commas(tmp_path):
    bids_run(tmp_path / "derivatives", "01", n_frames=12)
    path = tmp_path / "pheno.csv"  # as a spreadsheet saves "CSV" where commas mark decimals, with its BOM
    path.write_text("\ufeffparticipant_id;score;site\n01;1,5;Lyon, France\n", encoding="utf-8")
    report = prepare(tmp_path / "derivatives", tmp_path / "store", OPTIONS, participants=path, progress=False)
    assert report.ok and report.phenotypes.startswith("phenotype table pheno.csv: 1 of 1 participants")
    assert read_tsv(tmp_path / "store" / "participants.tsv") == [
        {"participant_id": "sub-01", "score": "1.5", "site": "Lyon, France"}]


def test_task_keeps_the_runs_of_one_bids_task(tmp_path):
    root = tmp_path / "derivatives"
    rest = bids_run(root, "01", n_frames=12)
    for path in sorted(rest.parent.iterdir()):
        (path.parent / path.name.replace("task-rest", "task-wm")).write_bytes(path.read_bytes())
    assert sorted(s.task for s in discover(root)) == ["rest", "wm"]
    (spec,) = discover(root, task="wm")
    assert spec.run_id == "sub-01_task-wm_run-1"
    report = prepare(root, tmp_path / "store", OPTIONS, progress=False, task="rest")
    assert report.done == ["sub-01_task-rest_run-1"]


def test_a_manifest_with_uk_biobank_ids_joins_its_eid_table(tmp_path, capsys):
    for eid in ("1000015", "1000027"):
        save(tmp_path / f"{eid}_20227_2_0" / "rfMRI_MNI.nii.gz", bold(12, int(eid) % 7))
    (tmp_path / "ukb_runs.tsv").write_text("participant_id\tsession\tpath\n" + "".join(
        f"{eid}\t2\t{eid}_20227_2_0/rfMRI_MNI.nii.gz\n" for eid in ("1000015", "1000027")))
    (tmp_path / "ukb.csv").write_text("eid,31-0.0,21003-2.0\n1000015,0,64\n1000027,1,71\n")
    report = prepare(tmp_path / "ukb_runs.tsv", tmp_path / "store", OPTIONS, participants=tmp_path / "ukb.csv",
                     id_column="eid", progress=False)
    assert report.ok and report.phenotypes.startswith("phenotype table ukb.csv: 2 of 2 participants")
    store = Store(tmp_path / "store")
    assert store.run_ids == ["1000015_ses-2", "1000027_ses-2"]
    assert [(r["participant_id"], r["21003-2.0"]) for r in store.phenotypes()] == [("1000015", "64"),
                                                                                  ("1000027", "71")]


def test_hcp_runs_get_their_global_signal_for_denoising(hcp, tmp_path):
    report = prepare(hcp, tmp_path / "store", OPTIONS, progress=False, task="rest")
    assert report.ok
    store = Store(tmp_path / "store")
    run = store.run("sub-100307_rfMRI_REST1_LR")
    table = run.confounds()
    frames = nib.load(str(hcp / "100307/MNINonLinear/Results/rfMRI_REST1_LR/rfMRI_REST1_LR.nii.gz")).get_fdata()
    mask = nib.load(str(hcp / "100307/MNINonLinear/Results/rfMRI_REST1_LR/brainmask_fs.2.nii.gz")).get_fdata() > 0
    assert np.allclose(table["global_signal"], frames[mask].mean(0), rtol=1e-6)
    assert run.attributes["computed_confounds"] == ["global_signal"] and "trans_x" in table
    # regressed out of the model's input too: the store's brain-mean series no longer follows it
    assert prepare(hcp, tmp_path / "gsr", replace(OPTIONS, normalization="voxel_center", global_signal=True),
                   progress=False, task="rest").ok
    denoised = Store(tmp_path / "gsr")
    z = denoised.run("sub-100307_rfMRI_REST1_LR").read(0, N_FRAMES).astype(np.float64)
    inside = denoised.mask("sub-100307_rfMRI_REST1_LR")
    assert denoised.info["denoising"] == "global_signal"
    assert abs(np.corrcoef(z[:, inside].mean(1), table["global_signal"])[0, 1]) < 0.05


def tissue_run(root: Path, n_frames: int = 64, seed: int = 5) -> tuple[Path, np.ndarray, np.ndarray]:
    """An HCP run whose subject has a wmparc: white matter (2, 41, 3001) inside the brain, ventricles (4, 43)
    at its centre, cortex (3, 42) around; a slow signal planted in the white matter, another in the CSF."""
    folder = root / "100307" / "MNINonLinear" / "Results" / "rfMRI_REST1_LR"
    brain = brain_mask()
    idx = np.indices(brain.shape)
    centre = np.array([20, 25, 21])[:, None, None, None]
    radius = np.sqrt((((idx - centre) / np.array([9, 12, 9])[:, None, None, None]) ** 2).sum(0))
    labels = np.where(brain, 3, 0) + np.where(brain & (idx[0] >= 20), 39, 0)  # cortex 3 left, 42 right
    white = brain & (radius < 0.8)
    labels[white] = np.where(idx[0][white] < 20, 2, 41)
    labels[white & (idx[2] > 24)] = 3001  # a wmparc white-matter parcel
    ventricles = brain & (radius < 0.25)
    labels[ventricles] = np.where(idx[0][ventricles] < 20, 4, 43)
    save(root / "100307" / "MNINonLinear" / "ROIs" / "wmparc.2.nii.gz", labels.astype(np.int32))
    rng = np.random.default_rng(seed)
    wm_signal, csf_signal = (np.cumsum(rng.standard_normal((2, n_frames)), axis=1) * 10)
    data = bold(n_frames, seed)
    data[white & ~ventricles] += wm_signal.astype(np.float32)
    data[ventricles] += csf_signal.astype(np.float32)
    save(folder / "rfMRI_REST1_LR.nii.gz", data)
    save(folder / "brainmask_fs.2.nii.gz", brain.astype(np.uint8))
    np.savetxt(folder / "Movement_Regressors.txt", motion_parameters(n_frames, seed), fmt="  %.6f")
    return folder, wm_signal, csf_signal


def test_hcp_runs_get_tissue_signals_compcor_and_cosines_from_wmparc(tmp_path):
    from nilearn.glm.first_level import make_first_level_design_matrix
    from scipy.ndimage import binary_erosion

    folder, wm_signal, csf_signal = tissue_run(tmp_path / "hcp")
    (spec,) = discover(tmp_path / "hcp")
    assert spec.segmentation == tmp_path / "hcp/100307/MNINonLinear/ROIs/wmparc.2.nii.gz"
    assert prepare(tmp_path / "hcp", tmp_path / "store", OPTIONS, progress=False).ok
    run = Store(tmp_path / "store").run(spec.run_id)
    table = run.confounds()
    frames = nib.load(str(folder / "rfMRI_REST1_LR.nii.gz")).get_fdata()
    labels = nib.load(str(tmp_path / "hcp/100307/MNINonLinear/ROIs/wmparc.2.nii.gz")).get_fdata()
    white = binary_erosion(np.isin(labels, [2, 41, 3001]))
    assert np.allclose(table["white_matter"], frames[white].mean(0), rtol=1e-6)
    assert np.allclose(table["csf"], frames[np.isin(labels, [4, 43])].mean(0), rtol=1e-6)
    # 64 frames of 2 s: two cosines of a 128 s high-pass, fMRIPrep's and nilearn's
    drift = make_first_level_design_matrix(np.arange(64) * 2.0, drift_model="cosine", high_pass=1 / 128)
    assert np.allclose(np.column_stack([table["cosine00"], table["cosine01"]]), drift[["drift_1", "drift_2"]])
    assert run.attributes["computed_confounds"] == ["global_signal", "white_matter", "csf"] + [
        f"a_comp_cor_0{i}" for i in range(5)] + ["cosine00", "cosine01"]
    # CompCor finds both planted tissue signals (high-passed as its voxels are)
    components = np.column_stack([table[f"a_comp_cor_0{i}"] for i in range(5)])
    basis = np.column_stack([np.ones(64), table["cosine00"], table["cosine01"]])
    for planted in (wm_signal, csf_signal):
        target = planted - basis @ np.linalg.lstsq(basis, planted, rcond=None)[0]
        fit = components @ np.linalg.lstsq(components, target, rcond=None)[0]
        assert np.corrcoef(fit, target)[0, 1] > 0.9  # 0.9995 and 0.93 (64 CSF voxels)

    # connectivity denoises the HCP run's parcel series with them, as an fMRIPrep run's
    atlas = tmp_path / "hcp/100307/MNINonLinear/ROIs/wmparc.2.nii.gz"  # any label image on an MNI grid
    for strategy in ("simple", "compcor"):
        assert main(["connectivity", "--store", str(tmp_path / "store"), "--atlas", str(atlas), "--confounds",
                     strategy, "--out", str(tmp_path / f"fc-{strategy}"), "--quiet", "true"]) == 0
        assert np.load(tmp_path / f"fc-{strategy}" / "connectivity.npz")["matrices"].shape == (1, 7, 7)

    # the model's input denoised with them: the white matter no longer carries its signal
    for strategy in ("simple", "compcor"):
        options = replace(OPTIONS, normalization="voxel_center", confounds=strategy)
        assert prepare(tmp_path / "hcp", tmp_path / strategy, options, progress=False).ok
        store = Store(tmp_path / strategy)
        z = store.run(spec.run_id).read(0, 64).astype(np.float64)
        before = Store(tmp_path / "store").run(spec.run_id).read(0, 64).astype(np.float64)
        inside = store.mask(spec.run_id)
        assert abs(np.corrcoef(before[:, inside].mean(1), wm_signal)[0, 1]) > 0.5
        assert abs(np.corrcoef(z[:, inside].mean(1), wm_signal)[0, 1]) < 0.1
        regressors = store.run(spec.run_id).attributes["denoising"]["regressors"]
        assert regressors == 24 + 2 + (2 if strategy == "simple" else 5)  # motion, cosines, tissue


def test_an_hcp_run_without_wmparc_is_refused_for_simple_with_the_file_it_needs(hcp, tmp_path):
    options = replace(OPTIONS, normalization="voxel_center", confounds="simple")
    report = prepare(hcp, tmp_path / "store", options, progress=False, task="rest")
    assert not report.ok and len(report.failed) == 2
    message = report.failed["sub-100307_rfMRI_REST1_LR"]
    assert "no column(s) white_matter, csf for --confounds simple" in message
    assert "MNINonLinear/ROIs/wmparc.2.nii.gz, in the structural package" in message


def test_hcp_7t_runs_use_their_own_grid_names(tmp_path):
    folder = tmp_path / "hcp7t" / "100610" / "MNINonLinear" / "Results" / "rfMRI_REST1_7T_PA"
    save(folder / "rfMRI_REST1_7T_PA.nii.gz", bold(12))
    save(folder / "brainmask_fs.1.60.nii.gz", brain_mask().astype(np.uint8))
    save(tmp_path / "hcp7t/100610/MNINonLinear/ROIs/wmparc.1.60.nii.gz", brain_mask().astype(np.int32) * 2)
    (spec,) = discover(tmp_path / "hcp7t")
    assert (spec.mask.name, spec.segmentation.name, spec.task) == ("brainmask_fs.1.60.nii.gz", "wmparc.1.60.nii.gz",
                                                                    "rest")


def test_preparing_again_adds_the_tissue_signals_once_wmparc_is_there(tmp_path, capsys):
    tissue_run(tmp_path / "hcp")
    rois = tmp_path / "hcp/100307/MNINonLinear/ROIs"
    rois.rename(tmp_path / "ROIs")  # the structural package not downloaded yet
    assert prepare(tmp_path / "hcp", tmp_path / "store", OPTIONS, progress=False).ok
    store = Store(tmp_path / "store")
    run_id = store.run_ids[0]
    frames = store.read_window(run_id, start=0, length=64)
    assert "white_matter" not in store.run(run_id).confounds()
    (tmp_path / "ROIs").rename(rois)
    report = prepare(tmp_path / "hcp", tmp_path / "store", OPTIONS, progress=False, workers=2)  # in a worker
    assert report.ok and report.skipped == [run_id] and not report.done  # no frame prepared twice
    run = Store(tmp_path / "store").run(run_id)
    assert np.array_equal(store.read_window(run_id, start=0, length=64), frames)
    assert {"white_matter", "csf", "a_comp_cor_04"} <= set(run.confounds())
    assert run.attributes["computed_confounds"] == ["global_signal", "cosine00", "cosine01", "white_matter", "csf"] + [
        f"a_comp_cor_0{i}" for i in range(5)]
    table = tmp_path / "store" / "runs" / f"{run_id}.zarr" / "confounds.tsv"
    written = table.stat().st_mtime_ns
    assert prepare(tmp_path / "hcp", tmp_path / "store", OPTIONS, progress=False).ok
    assert table.stat().st_mtime_ns == written  # nothing left to add


def test_a_dry_run_says_what_prepare_would_do_and_writes_nothing(hcp, tmp_path, capsys):
    store = tmp_path / "store"
    args = ["prepare", str(hcp), "--out", str(store), "--min_frames", "8", "--dry_run", "true", "--quiet", "true"]
    assert main(args + ["--confounds", "simple"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert not store.exists()
    assert out[0] == "dry run (nothing written): 3 run(s) to prepare, 0 already in the store"
    assert out[1] == ("3 with a brain mask (else computed), 3 with a confounds table, 0 with FreeSurfer labels "
                      "(HCP wmparc)")
    assert out[2:6] == ["frames: 24 (3 run(s))",
                        "leading non-steady-state frames dropped: found in their first 40 frames when prepared (3 "
                        "run(s) without fMRIPrep's markers)",  # an HCP motion table marks none
                        "TR: 2 s (3 run(s))",
                        "grid: 4x4x4 mm, not aligned: refused without --resample (3 run(s))"]  # the 2 mm box
    assert out[6] == ("would fail, no column(s) white_matter, csf for --confounds simple (an HCP run gets them from "
                      "<subject>/MNINonLinear/ROIs/wmparc.2.nii.gz, in the structural package): "
                      "sub-100307_rfMRI_REST1_LR, sub-100307_tfMRI_WM_LR, sub-100408_rfMRI_REST1_LR")
    assert prepare(hcp, store, OPTIONS, progress=False, task="rest").ok
    assert main(args + ["--voxel_size", "4"]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if "non-steady" not in line][:5] == [
        "dry run (nothing written): 1 run(s) to prepare, 2 already in the store",
        "1 with a brain mask (else computed), 1 with a confounds table, 0 with FreeSurfer labels (HCP wmparc)",
        "frames: 24 (1 run(s))", "TR: 2 s (1 run(s))", "grid: 4x4x4 mm, aligned with the target box (1 run(s))"]


def test_frame_signals_of_a_run_of_unknown_tr_have_compcor_without_cosines():
    from neurox.data.tissue import FrameSignals

    rng = np.random.default_rng(0)
    frames = rng.normal(size=(6, 5, 4, 30)).astype(np.float32)
    mask = np.zeros((6, 5, 4), dtype=bool)
    mask[1:5, 1:4, 1:3] = True
    signals = FrameSignals(30, {"csf": mask}, mask, cosine=False)
    signals.add(0, frames[..., :16])
    signals.add(16, frames[..., 16:])
    table = {}
    names = signals.into(table, None)
    assert names == ["csf"] + [f"a_comp_cor_0{i}" for i in range(5)] and set(table) == set(names)
    assert np.allclose(table["csf"], frames[mask].mean(0), atol=1e-6)
    components = np.column_stack([table[f"a_comp_cor_0{i}"] for i in range(5)])
    assert np.allclose(components.T @ components, np.eye(5), atol=1e-8)  # orthonormal
    assert np.allclose(components.sum(0), 0, atol=1e-8)  # the mean removed
