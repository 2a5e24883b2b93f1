"""``neurox connectivity``: parcel series and matrices from a store, and the planted coupling recovered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neurox.cli import main
from neurox.data.prepare import prepare
from neurox.data.preprocess import PrepareOptions, TargetGrid
from neurox.data.store import read_tsv
from neurox.data.synthetic import SynthOptions, synthesize


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    """(cohort, store): 8 participants, 4 in each coupling group, 200 frames on the 4 mm grid."""
    root = tmp_path_factory.mktemp("synthetic")
    cohort = synthesize(root / "cohort", SynthOptions(n_subjects=8, n_frames=200, voxel_size_mm=4.0, seed=5),
                        progress=False)
    report = prepare(cohort, root / "store", PrepareOptions(grid=TargetGrid.default(4.0)), progress=False)
    assert report.ok
    return cohort, root / "store"


def atlas_of(cohort: Path) -> Path:
    return next((cohort / "ground_truth").glob("atlas-synthetic_space-*_dseg.nii.gz"))


def test_connectivity_recovers_the_planted_coupling(synthetic, tmp_path):
    cohort, store = synthetic
    out = tmp_path / "fc"
    assert main(["connectivity", "--store", str(store), "--atlas", str(atlas_of(cohort)), "--out", str(out),
                 "--group_by", "coupling_group", "--quiet", "true"]) == 0
    data = np.load(out / "connectivity.npz")
    assert data["matrices"].shape == (8, 40, 40) and str(data["kind"]) == "fisher_z"
    assert list(data["names"][:2]) == ["parcel001", "parcel002"]  # names from the atlas' TSV
    assert [r["participant_id"] for r in read_tsv(out / "participants.tsv")] == list(data["participants"])
    assert (out / "group_mean.png").stat().st_size > 10_000
    series = np.load(out / "parcel_series.npz")
    assert series[sorted(k for k in series.files if k != "labels")[0]].shape == (200, 40)

    truth = json.loads((cohort / "ground_truth" / "ground_truth.json").read_text())
    networks = {row["index"]: row["network"] for row in read_tsv(cohort / "ground_truth" / "atlas-synthetic_dseg.tsv")}
    index = {int(label): i for i, label in enumerate(data["labels"])}
    b = [index[p] for p in truth["coupling_group"]["parcels"] if networks[str(p)] == "B"]
    c = [index[p] for p in truth["coupling_group"]["parcels"] if networks[str(p)] == "C"]
    d = [index[int(p)] for p, n in networks.items() if n == "D"]
    groups = {p["participant_id"]: p["coupling_group"] for p in read_tsv(out / "participants.tsv")}
    member = np.array([groups[p] == "1" for p in data["participants"]])

    def mean_between(rows, cols):
        return data["matrices"][:, rows][:, :, cols].mean(axis=(1, 2))

    coupled = mean_between(b, c)
    # planted: C shares part of B's activity (rho 0.1 in group 0, 0.6 in group 1)
    assert coupled[member].min() > coupled[~member].max()
    assert coupled[member].mean() - coupled[~member].mean() > 0.2
    control = mean_between(b, d)  # B and D are not coupled in either group
    assert abs(control[member].mean() - control[~member].mean()) < 0.1
    assert np.allclose(data["group_mean_1"] - data["group_mean_0"],
                       data["matrices"][member].mean(0) - data["matrices"][~member].mean(0), atol=1e-5)


@pytest.mark.parametrize("kind", ["plain", "partial"])
def test_connectivity_kinds(synthetic, tmp_path, kind):
    cohort, store = synthetic
    assert main(["connectivity", "--store", str(store), "--atlas", str(atlas_of(cohort)), "--out", str(tmp_path),
                 "--kind", kind, "--participants", "sub-01", "sub-02", "--quiet", "true"]) == 0
    data = np.load(tmp_path / "connectivity.npz")
    matrices = data["matrices"]
    assert list(data["participants"]) == ["sub-01", "sub-02"]
    assert np.allclose(matrices, matrices.transpose(0, 2, 1), atol=1e-5)
    assert np.allclose(matrices[:, range(40), range(40)], 1.0) and np.abs(matrices).max() <= 1 + 1e-5


def test_connectivity_bad_input_is_one_line(synthetic, tmp_path, capsys):
    cohort, store = synthetic
    assert main(["connectivity", "--store", str(store), "--atlas", str(tmp_path / "none.nii.gz"),
                 "--out", str(tmp_path / "a")]) == 1
    assert main(["connectivity", "--store", str(store), "--atlas", str(atlas_of(cohort)), "--out", str(tmp_path / "b"),
                 "--group_by", "no_such_column"]) == 1
    assert main(["connectivity", "--store", str(store), "--atlas", str(atlas_of(cohort)), "--out", str(tmp_path / "c"),
                 "--participants", "sub-77"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "none.nii.gz" in lines[0] and "no_such_column" in lines[1] and "sub-77" in lines[2]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
