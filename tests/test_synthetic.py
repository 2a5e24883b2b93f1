"""``neurox synth``: layout, determinism, and that each planted effect is really there."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fakes import subprocess_env

from neurox.cli import main
from neurox.data.grid import TargetGrid
from neurox.data.prepare import prepare
from neurox.data.preprocess import PrepareOptions
from neurox.data.store import Store
from neurox.data.synthetic import SynthOptions, band_limited, network_signals, synthesize

TINY = SynthOptions(n_subjects=4, n_frames=24, voxel_size_mm=4.0, seed=3)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth") / "cohort", TINY, progress=False)


def test_layout_is_fmriprep_like_and_prepare_reads_it(cohort, tmp_path):
    description = json.loads((cohort / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    header = (cohort / "participants.tsv").read_text().splitlines()[0].split("\t")
    assert header == ["participant_id", "amplitude_group", "coupling_group", "order_group", "lowfreq_score"]
    func = cohort / "sub-01" / "func"
    bold = func / "sub-01_task-rest_run-1_space-MNI152NLin2009cAsym_res-4_desc-preproc_bold.nii.gz"
    img = nib.load(str(bold))
    assert img.shape == (51, 56, 45, 24) and img.header.get_zooms()[3] == pytest.approx(0.8)
    assert np.allclose(np.asanyarray(img.dataobj)[..., 0][img.get_fdata()[..., 0] != 0].mean(), 1000, rtol=0.1)
    truth = json.loads((cohort / "ground_truth" / "ground_truth.json").read_text())
    assert set(truth) >= {"amplitude_group", "coupling_group", "order_group", "lowfreq_score"}
    effect = nib.load(str(cohort / "ground_truth" / truth["coupling_group"]["map"])).get_fdata()
    assert 0 < effect.sum() < (img.get_fdata()[..., 0] != 0).sum()

    report = prepare(cohort, tmp_path / "store", PrepareOptions(grid=TargetGrid.default(4.0), min_frames=20),
                     progress=False)
    assert report.ok and len(report.done) == 4
    store = Store(tmp_path / "store")
    assert store.run(store.run_ids[0]).attributes["mask_source"] == "given"
    assert store.read_window(store.run_ids[0], 0, 20).shape == (1, 48, 48, 48, 20)


def test_same_seed_same_bytes(cohort, tmp_path):
    again = synthesize(tmp_path / "again", TINY, progress=False, workers=2)  # parallel: the same bytes
    assert digest(again) == digest(cohort)
    other = synthesize(tmp_path / "other", SynthOptions(**{**TINY.__dict__, "seed": 4}), progress=False)
    assert digest(other) != digest(cohort)


def test_non_steady_state_frames_are_planted_and_marked_as_fmriprep_does(cohort, tmp_path):
    options = SynthOptions(**{**TINY.__dict__, "non_steady_frames": 2})
    marked = synthesize(tmp_path / "marked", options, progress=False)
    name = "sub-01/func/sub-01_task-rest_run-1_space-MNI152NLin2009cAsym_res-4_desc-preproc_bold.nii.gz"
    frames, plain = (nib.load(str(folder / name)).get_fdata() for folder in (marked, cohort))
    brain = plain[..., 0] != 0
    assert np.array_equal(frames[..., 2:], plain[..., 2:])  # the steady frames are the cohort's own
    assert frames[brain, 0].mean() / plain[brain, 0].mean() == pytest.approx(1.5, rel=1e-3)
    assert frames[brain, 1].mean() / plain[brain, 1].mean() == pytest.approx(1.25, rel=1e-3)
    report = prepare(marked, tmp_path / "store", PrepareOptions(grid=TargetGrid.default(4.0), min_frames=20),
                     progress=False)
    store = Store(tmp_path / "store")
    assert report.ok and [r["non_steady_state_dropped"] for r in store.manifest] == ["2"] * 4
    assert [r["n_frames"] for r in store.manifest] == ["22"] * 4
    with pytest.raises(ValueError, match="non_steady_frames must be 0 to 16"):
        SynthOptions(**{**TINY.__dict__, "non_steady_frames": 17})


def test_cli(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "c"), "--n_subjects", "2", "--n_frames", "10", "--voxel_size", "4",
                 "--quiet", "true"]) == 0
    assert "ground truth" in capsys.readouterr().out
    with pytest.raises(ValueError, match="voxel_size_mm must be 2 or 4"):
        SynthOptions(voxel_size_mm=3.0)


def test_ctrl_c_ends_a_command_in_one_line(tmp_path):
    """Outside training (where a first Ctrl-C checkpoints and stops), Ctrl-C ends a command with one line and the
    shell's status for SIGINT, not a traceback of every worker, and the workers' queue is dropped: the command
    does not first write every run it had queued."""
    out = tmp_path / "c"

    def as_a_terminal():  # its own process group, taking Ctrl-C (a background job's tests would ignore it)
        os.setpgrp()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = subprocess.Popen([sys.executable, "-m", "neurox.cli", "synth", str(out), "--n_subjects", "400",
                                "--n_frames", "40", "--voxel_size", "4", "--workers", "2", "--quiet", "true"],
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=as_a_terminal)
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None and not any(out.glob("sub-*/func/*bold.nii.gz")):
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal sends it: to the command and its workers
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.strip() == "neurox synth: interrupted", stderr[-2000:]
    assert len(list(out.glob("sub-*/func/*bold.nii.gz"))) < 100  # all 400 when the queue ran to its end


def test_planted_effects_in_the_network_signals():
    """Each effect changes what it should and leaves alone what it should (large n for tight stats)."""
    n, tr = 4000, 0.8

    def signals(**groups):
        subject = {"amplitude_group": 0, "coupling_group": 0, "order_group": 0, "lowfreq_score": 0.0, **groups}
        return network_signals(np.random.default_rng(0), n, tr, subject, effect_size=1.0)

    base = signals()
    # amplitude: A's standard deviation grows by half, nothing else moves
    assert signals(amplitude_group=1)["A"].std() == pytest.approx(1.5 * base["A"].std(), rel=1e-6)
    # coupling: corr(B, C) rises, variances stay 1
    low, high = base, signals(coupling_group=1)
    assert np.corrcoef(high["B"], high["C"])[0, 1] > np.corrcoef(low["B"], low["C"])[0, 1] + 0.4
    assert high["C"].std() == pytest.approx(1.0, abs=0.05)
    # temporal order: identical zero-lag correlation, opposite lead
    g0, g1 = base, signals(order_group=1)
    assert np.corrcoef(g0["D"], g0["E"])[0, 1] == pytest.approx(np.corrcoef(g1["D"], g1["E"])[0, 1], abs=1e-12)
    lag = 2
    lead0 = np.corrcoef(g0["D"][:-lag], g0["E"][lag:])[0, 1]  # D now, E later
    lead1 = np.corrcoef(g1["D"][:-lag], g1["E"][lag:])[0, 1]
    assert lead0 > lead1 + 0.2
    # low frequency: F's power below 0.03 Hz grows with the score
    def slow_power(x):
        spectrum = np.abs(np.fft.rfft(x)) ** 2
        return spectrum[np.fft.rfftfreq(n, tr) < 0.03].sum()
    assert slow_power(signals(lowfreq_score=1.0)["F"]) > 2 * slow_power(base["F"])


def test_band_limited_noise_has_no_power_outside_its_band():
    x = band_limited(np.random.default_rng(0), 1000, 0.8, 0.01, 0.1)
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(1000, 0.8)
    assert spectrum[(freqs > 0.1) | (freqs < 0.01)].sum() < 1e-12 * spectrum.sum()
    assert x.std() == pytest.approx(1.0)
