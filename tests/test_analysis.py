"""Analysis commands: connectivity (planted coupling recovered), explain (a known-answer model), embed."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import fakes
import nibabel as nib
import numpy as np
import pytest
import torch
from fakes import OPTIONS, as_las, bids_run

from neurox.analysis.connectivity import participant_matrices, store_atlas
from neurox.analysis.explain import (
    ExplainOptions,
    attribute,
    contrasts_of,
    participant_map,
    smooth_in_brain,
    to_source_grid,
)
from neurox.cli import main
from neurox.data.grid import TargetGrid
from neurox.data.loader import fit_to_grid
from neurox.data.prepare import prepare
from neurox.data.preprocess import PrepareOptions
from neurox.data.store import Store, read_tsv
from neurox.data.synthetic import SynthOptions, synthesize


def cohort_and_store(root: Path, n_frames: int) -> tuple[Path, Path]:
    """8 participants, 4 in each group of every planted effect, on the 4 mm grid (two processes: both cores)."""
    cohort = synthesize(root / "cohort", SynthOptions(n_subjects=8, n_frames=n_frames, voxel_size_mm=4.0, seed=5),
                        progress=False, workers=2)
    report = prepare(cohort, root / "store", PrepareOptions(grid=TargetGrid.default(4.0)), progress=False, workers=2)
    assert report.ok
    return cohort, root / "store"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    """(cohort, store) of 200 frames: enough for the planted coupling to show in each participant's FC."""
    return cohort_and_store(tmp_path_factory.mktemp("synthetic"), 200)


@pytest.fixture(scope="module")
def short(tmp_path_factory) -> tuple[Path, Path]:
    """(cohort, store) of 40 frames, two windows each: what a model reads, at a fifth of the cost."""
    return cohort_and_store(tmp_path_factory.mktemp("short"), 40)


@pytest.fixture(scope="module")
def trained(short, tmp_path_factory) -> Path:
    """A run fine-tuned for two steps on the short store (its weights barely moved: what matters is the path)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["finetune", "--store", str(short[1]), "--target", "amplitude_group", "--out", str(run), "--epochs",
                 "1", "--max_steps", "2", "--batch_size", "2", "--n_boot", "20", "--loader_workers", "0"]) == 0
    return run


def atlas_of(cohort: Path) -> Path:
    return next((cohort / "ground_truth").glob("atlas-synthetic_space-*_dseg.nii.gz"))


def test_connectivity_recovers_the_planted_coupling(synthetic, tmp_path):
    cohort, store = synthetic
    out = tmp_path / "fc"
    assert main(["connectivity", "--store", str(store), "--atlas", str(atlas_of(cohort)), "--out", str(out),
                 "--group_by", "coupling_group", "--nbs", "3", "--permutations", "200", "--quiet", "true"]) == 0
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

    # edgewise statistics: the strongest edges are the planted B-C pairs; without covariates, the group
    # coefficient's t is the pooled two-sample t-test's
    from scipy import stats

    edges = read_tsv(out / "edges.tsv")
    assert len(edges) == 40 * 39 // 2 and list(edges[0])[:4] == ["parcel_a", "parcel_b", "mean_0", "mean_1"]
    parcel = {name: int(label) for name, label in zip(data["names"], data["labels"])}
    planted = {frozenset(pair) for pair in
               [(x, y) for x in truth["coupling_group"]["parcels"] for y in truth["coupling_group"]["parcels"]
                if {networks[str(x)], networks[str(y)]} == {"B", "C"}]}
    assert all(frozenset((parcel[e["parcel_a"]], parcel[e["parcel_b"]])) in planted for e in edges[:2])  # of 780
    one, other = index[parcel[edges[0]["parcel_a"]]], index[parcel[edges[0]["parcel_b"]]]
    reference = stats.ttest_ind(data["matrices"][member, one, other], data["matrices"][~member, one, other])
    assert float(edges[0]["t"]) == pytest.approx(reference.statistic, rel=1e-3)
    assert float(edges[0]["p"]) == pytest.approx(reference.pvalue, rel=1e-3)
    assert data["edge_t"][one, other] == data["edge_t"][other, one] == pytest.approx(reference.statistic, rel=1e-3)
    summary = json.loads((out / "edges.json").read_text())
    assert (summary["test"], summary["n"], summary["covariates"]) == ("two groups: 1 vs 0", 8, [])
    # networks (the atlas TSV's network column): within- and between-network means, and their statistics
    names = list(data["network_names"])
    assert names == sorted(set(networks.values())) and {"B", "C", "none"} <= set(names)
    members = {n: [index[int(p)] for p, m in networks.items() if m == n] for n in names}
    within_b = data["matrices"][:, members["B"]][:, :, members["B"]]
    upper = np.triu_indices(len(members["B"]), k=1)
    nb, nc = names.index("B"), names.index("C")
    assert np.allclose(data["network_matrices"][:, nb, nb], within_b[:, upper[0], upper[1]].mean(1), atol=1e-5)
    assert np.allclose(data["network_matrices"][:, nb, nc], mean_between(members["B"], members["C"]), atol=1e-5)
    table = read_tsv(out / "networks.tsv")
    assert [r["participant_id"] for r in table] == list(data["participants"]) and "B-C" in table[0]
    blocks = {(r["network_a"], r["network_b"]): r for r in read_tsv(out / "network_edges.tsv")}
    assert float(blocks["B", "C"]["t"]) > 3  # the planted coupling (8 participants: third of the 45 blocks)
    assert summary["networks"]["edges"] == len(blocks) == len(names) * (len(names) + 1) // 2

    # the network-based statistic: what nbs.tsv, the npz and edges.json say is what its parts give on the matrices
    # written (8 participants are too few for its p-values to find the coupling: its unit tests show its power)
    from neurox.analysis.edges import edge_design
    from neurox.analysis.nbs import NBSOptions, PermutedT, network_based_statistic, permutations

    i, j = np.triu_indices(40, k=1)
    edges, design = data["matrices"][:, i, j].astype(np.float64), edge_design([str(int(m)) for m in member], {})[0]
    permuted = PermutedT(design, permutations(8, NBSOptions(3.0, 200, 0))).t(edges)
    found, edge_component, _ = network_based_statistic(
        PermutedT(design, np.arange(8)[None]).t(edges)[0], (permuted > 3).astype(np.int8) - (permuted < -3), 3.0,
        i, j, 40)
    rows = read_tsv(out / "nbs.tsv")
    assert [(int(r["edges"]), r["sign"], float(r["p_fwe"])) for r in rows] == \
        [(c["edges"], c["sign"], pytest.approx(c["p_fwe"], rel=1e-3)) for c in found] and len(rows) >= 2
    assert np.array_equal(data["nbs_components"][i, j], edge_component)
    assert (np.abs(data["edge_t"][i, j][edge_component > 0]) > 3).all()
    assert len(rows[0]["parcels_by_degree"].split(", ")) == int(rows[0]["parcels"])
    for row in rows:  # the atlas' networks: each edge counted once, under its (sorted) pair of networks
        counted = [re.fullmatch(r"(\S+)-(\S+) \((\d+)\)", part).groups() for part in row["network_pairs"].split(", ")]
        assert sum(int(c) for _, _, c in counted) == int(row["edges"]) and all(a <= b for a, b, _ in counted)
    nbs = summary["nbs"]
    assert (nbs["threshold"], nbs["permutations"], nbs["seed"]) == (3.0, 200, 0)
    assert [c["edges"] for c in nbs["components"]] == [c["edges"] for c in found[:10]]


def test_activation_patterns_find_the_signal_not_the_noise_a_weight_cancels():
    """Haufe et al. 2014: x1 = signal + noise, x2 = noise; the model y = x1 - x2 weighs both alike, but only x1
    goes with what it predicts."""
    from neurox.analysis.patterns import activation_patterns

    rng = np.random.default_rng(0)
    signal, noise = rng.standard_normal(500), rng.standard_normal(500)
    x = np.column_stack([signal + noise, noise, np.ones(500)]).astype(np.float32)  # and an edge that never varies
    patterns = activation_patterns(x, (x[:, 0] - x[:, 1])[:, None])
    assert patterns.shape == (1, 3) and patterns[0, 0] > 0.65 and abs(patterns[0, 1]) < 0.1 and patterns[0, 2] == 0


def test_baseline_patterns_rank_the_planted_coupling_first(synthetic, tmp_path):
    cohort, store = synthetic
    out = tmp_path / "fc"
    assert main(["baseline", "--store", str(store), "--atlas", str(atlas_of(cohort)), "--target", "coupling_group",
                 "--folds", "4", "--n_boot", "0", "--out", str(out), "--quiet", "true"]) == 0
    edges = read_tsv(out / "patterns.tsv")
    assert len(edges) == 40 * 39 // 2 and list(edges[0])[:6] == ["parcel_a", "parcel_b", "name_a", "name_b",
                                                                  "network_a", "network_b"]
    assert {"coupling_group_weight", "coupling_group_pattern"} <= set(edges[0])
    # the planted pairs first, of 780 (as the edgewise tests find them: with 8 participants, chance correlations
    # come close behind)
    assert all({e["network_a"], e["network_b"]} == {"B", "C"} for e in edges[:2])
    assert float(edges[0]["coupling_group_pattern"]) > 0.8  # stronger in group 1
    networks = {(r["network_a"], r["network_b"]): float(r["coupling_group_pattern"])
                for r in read_tsv(out / "network_patterns.tsv")[:2]}
    assert networks.get(("B", "C"), 0) > 0.5  # among the two strongest of 28 network pairs


@pytest.mark.parametrize("kind", ["plain", "partial"])
def test_connectivity_kinds(synthetic, tmp_path, kind, capsys):
    cohort, store = synthetic
    assert main(["connectivity", "--store", str(store), "--atlas", str(atlas_of(cohort)), "--out", str(tmp_path),
                 "--kind", kind, "--participants", "sub-01", "sub-02", "--group_by", "coupling_group",
                 "--covariates", "mean_fd"]) == 0
    assert "connectivity: 2/2 (100%) participant" in capsys.readouterr().err  # the progress says it finished
    assert "leave no degrees of freedom" in json.loads((tmp_path / "edges.json").read_text())["skipped"]
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
    assert main(["connectivity", "--store", str(store), "--atlas", str(atlas_of(cohort)), "--out", str(tmp_path / "d"),
                 "--group_by", "coupling_group", "--covariates", "age_at_scan"]) == 1
    assert main(["connectivity", "--store", str(store), "--atlas", str(atlas_of(cohort)), "--out", str(tmp_path / "e"),
                 "--nbs", "3"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5 and "none.nii.gz" in lines[0] and "no_such_column" in lines[1] and "sub-77" in lines[2]
    assert "--covariates age_at_scan: not a column of" in lines[3]
    assert lines[4] == "neurox connectivity: error: --nbs: give --group_by, the effect whose edges it tests"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- explain ------------------------------------------------------------------------------------


class KnownLinearModel(torch.nn.Module):
    """output = sum(x * W): Integrated Gradients from a zero baseline must give exactly x * W."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)  # (C, X, Y, Z, T)
        self.config = SimpleNamespace(img_size=tuple(weight.shape[1:]))

    def forward(self, x):
        return (x * self.weight).flatten(1).sum(1, keepdim=True)


@pytest.fixture(scope="module")
def las_store(tmp_path_factory) -> Path:
    """A store prepared from one left-right flipped (LAS) run of 16 frames."""
    root = tmp_path_factory.mktemp("las")
    ras = bids_run(root / "ras", "01", n_frames=16, seed=4)
    las = root / "bids" / "sub-01" / "func" / ras.name
    as_las(ras, las)
    as_las(ras.with_name(ras.name.replace("desc-preproc_bold", "desc-brain_mask")),
           las.with_name(las.name.replace("desc-preproc_bold", "desc-brain_mask")))
    (las.parent / ras.with_suffix("").with_suffix(".json").name).write_text('{"RepetitionTime": 2.0}')
    assert prepare(root / "bids", root / "store", OPTIONS, progress=False).ok
    return root / "store"


def test_attribution_of_a_known_linear_model_lands_on_the_right_voxels(las_store, tmp_path):
    store = Store(las_store)
    run_id = store.run_ids[0]
    attrs = store.run(run_id).attributes
    # the model sees a 40^3 centre crop of the 48^3 store grid, 8 frames; weights on two voxels
    weight = torch.zeros(1, 40, 40, 40, 8)
    voxels = {(10, 20, 18): 1.5, (30, 12, 25): -2.0}
    for (i, j, k), w in voxels.items():
        weight[0, i, j, k, :] = w
    model = KnownLinearModel(weight)
    options = ExplainOptions(n_steps=4, reduce="signed", batch_size=2)
    windows = [store.read_frames(run_id, s, 8) for s in (0, 8)]
    x = torch.from_numpy(np.stack([fit_to_grid(w, (40, 40, 40)) for w in windows])).float().permute(0, 1, 3, 4, 5, 2)
    assert torch.allclose(attribute(model, x, 0, options), x * weight, atol=1e-5)

    volume = participant_map(model, store, [run_id], 0, options)
    assert volume.shape == (48, 48, 48)
    source = attrs["source"]
    native = to_source_grid(volume, np.array(attrs["affine"]), source["shape"], np.array(source["affine"]))
    assert native.shape == tuple(source["shape"][:3])
    expected = {}
    for (i, j, k), w in voxels.items():
        # model voxel -> store voxel (crop offset 4) -> MNI mm -> voxel of the LAS original, computed by hand
        store_voxel = np.array([i, j, k]) + 4
        world = np.array(attrs["affine"])[:3, :3] @ store_voxel + np.array(attrs["affine"])[:3, 3]
        src = np.round(np.linalg.inv(np.array(source["affine"])) @ [*world, 1])[:3].astype(int)
        x_values = x[:, 0, i, j, k, :].sum(-1).mean().item()  # mean over windows of the frames' sum
        expected[tuple(src)] = w * x_values
    assert {tuple(v) for v in np.argwhere(native != 0)} == set(expected)
    for src, value in expected.items():
        assert native[src] == pytest.approx(value, rel=1e-4)
    # left-right: the LAS file's first axis runs right to left, so x index = 39 - RAS index
    ras_src = {(int(np.round((np.array(attrs["affine"])[0, 3] + 4 * (i + 4) - fakes.AFFINE[0, 3]) / 4)), j, k)
               for (i, j, k) in voxels}
    assert {s[0] for s in expected} == {fakes.SHAPE[0] - 1 - r[0] for r in ras_src}


def test_contrasts_between_groups():
    two = {"all": ["a", "b", "c"], "g-0": ["a"], "g-1": ["b", "c"]}
    assert contrasts_of(two, "g") == {"g-1-minus-0": (["b", "c"], ["a"])}
    quantiles = {"all": list("abcd"), **{f"s-q{q}of4": [c] for q, c in zip(range(1, 5), "abcd")}}
    assert contrasts_of(quantiles, "s") == {"s-q4of4-minus-q1of4": (["d"], ["a"])}
    three = {"all": list("abc"), "d-x": ["a"], "d-y": ["b"], "d-z": ["c"]}
    assert contrasts_of(three, "d")["d-y-minus-rest"] == (["b"], ["a", "c"]) and len(contrasts_of(three, "d")) == 3
    assert contrasts_of({"all": ["a"]}, None) == {} and contrasts_of({"all": ["a"], "g-0": ["a"]}, "g") == {}


def test_group_maps_are_smoothed_inside_the_brain_only():
    brain = np.zeros((12, 12, 12), bool)
    brain[2:10, 2:10, 2:10] = True
    flat = np.where(brain, 3.0, 7.0)  # 7 outside must not leak in
    assert np.allclose(smooth_in_brain(flat, brain, 8.0, 4.0)[brain], 3.0)
    assert (smooth_in_brain(flat, brain, 8.0, 4.0)[~brain] == 0).all()
    spike = np.zeros((12, 12, 12))
    spike[5, 5, 5] = 1.0
    smoothed = smooth_in_brain(spike, brain, 8.0, 4.0)
    assert smoothed[5, 5, 5] < 1.0 and smoothed[5, 5, 6] > 0 and smoothed.argmax() == np.ravel_multi_index((5, 5, 5),
                                                                                                           spike.shape)
    assert smooth_in_brain(spike, brain, 0.0, 4.0) is spike


def test_explain_a_trained_run(short, trained, tmp_path, capsys):
    (cohort, store), run = short, trained
    out = tmp_path / "explain"
    group = {row["participant_id"]: row["amplitude_group"] for row in Store(store).phenotypes()}
    pair = [min(p for p in group if group[p] == value) for value in ("0", "1")]  # one of each group
    args = ["explain", str(run), "--store", str(store), "--out", str(out), "--subject", *pair,
            "--group_by", "amplitude_group", "--n_steps", "2", "--noise_samples", "1", "--quiet", "true",
            "--atlas", str(atlas_of(cohort))]
    assert main(args) == 0
    assert "regions of highest mean attribution" in capsys.readouterr().out
    # the regions that drove the output: each map's parcels ranked by their mean over the parcel's voxels
    regions = read_tsv(out / "regions.tsv")
    maps = ["all", "amplitude_group-0", "amplitude_group-1", "amplitude_group-1-minus-0"]
    assert [r["map"] for r in regions] == [m for m in maps for _ in range(40)]
    everyone = [r for r in regions if r["map"] == "all"]
    assert [int(r["rank"]) for r in everyone] == list(range(1, 41)) and everyone[0]["region"].startswith("parcel")
    assert sum(float(r["share"]) for r in everyone) == pytest.approx(1.0, abs=1e-3)
    assert all(r["share"] == "" for r in regions if r["map"].endswith("minus-0"))  # signed: no share
    atlas, _ = store_atlas(Store(store), atlas_of(cohort))  # the atlas on the store grid
    mean_map = np.mean([np.asarray(nib.load(str(out / f"{p}_space-store_attribution.nii.gz")).dataobj, np.float64)
                        for p in pair], axis=0)
    top = everyone[0]
    assert float(top["mean_attribution"]) == pytest.approx(mean_map[atlas == int(top["label"])].mean(), rel=1e-4)
    # the atlas TSV's networks: the regions summed per network, voxel-weighted
    networks = read_tsv(out / "networks.tsv")
    on_all = [r for r in networks if r["map"] == "all"]
    assert sum(float(r["share"]) for r in on_all) == pytest.approx(1.0, abs=1e-3)
    network_of = {r["region"]: r["network"] for r in everyone}
    first = on_all[0]["network"]
    members = [r for r in everyone if network_of[r["region"]] == first]
    expected = sum(int(r["voxels"]) * float(r["mean_attribution"]) for r in members) / sum(
        int(r["voxels"]) for r in members)
    assert float(on_all[0]["mean_attribution"]) == pytest.approx(expected, rel=1e-4)
    assert json.loads((out / "explain.json").read_text())["top_networks"]["all"] == [r["network"] for r in on_all[:3]]
    per_participant = read_tsv(out / "participant_regions.tsv")
    assert [r["participant_id"] for r in per_participant] == sorted(pair) and len(per_participant[0]) == 41
    summary = json.loads((out / "explain.json").read_text())
    assert summary["participants"] == sorted(pair) and "all" in summary["groups"]
    # the contrast map: group 1's mean minus group 0's, with its own PNG
    assert summary["contrasts"] == {"amplitude_group-1-minus-0": {"plus": [pair[1]], "minus": [pair[0]]}}
    volume = {name: np.asarray(nib.load(str(out / f"group-{name}_attribution.nii.gz")).dataobj)
              for name in ("amplitude_group-0", "amplitude_group-1", "amplitude_group-1-minus-0")}
    assert np.allclose(volume["amplitude_group-1-minus-0"], volume["amplitude_group-1"] - volume["amplitude_group-0"],
                       atol=1e-6 * np.abs(volume["amplitude_group-1"]).max())
    assert (out / "group-amplitude_group-1-minus-0_attribution.png").is_file()
    assert all(0.0 <= v <= 1.0 for v in summary["outside_brain_share"].values())
    native = nib.load(str(out / f"{pair[0]}_attribution.nii.gz"))
    source = nib.load(str(next((cohort / pair[0] / "func").glob("*desc-preproc_bold.nii.gz"))))
    assert native.shape == source.shape[:3] and np.allclose(native.affine, source.affine)
    assert (np.asarray(native.dataobj) >= 0).all() and np.asarray(native.dataobj).max() > 0  # abs, squared
    assert (out / "group-all_attribution.png").stat().st_size > 5_000
    stamp = (out / f"{pair[0]}_attribution.nii.gz").stat().st_mtime_ns
    assert main(args) == 0  # a re-run resumes: existing maps are kept
    assert (out / f"{pair[0]}_attribution.nii.gz").stat().st_mtime_ns == stamp
    assert main(args[:-2] + ["--n_steps", "3"]) == 1  # but never mixes maps of other settings
    assert f"{out} holds the outputs of neurox explain with other settings (n_steps differ); choose another --out" in \
        capsys.readouterr().err

    assert main(["explain", str(run), "--store", str(store), "--out", str(out), "--target", "nope"]) == 1
    assert "not 'nope'" in capsys.readouterr().err
    assert main(["explain", str(run), "--store", str(store), "--out", str(tmp_path / "x"), "--atlas",
                 str(tmp_path / "none.nii.gz")]) == 1  # refused before any attribution is computed
    assert "none.nii.gz" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["explain", str(run), "--store", str(store), "--out", str(tmp_path / "map.nii.gz"), "--subject",
                 pair[0]]) == 1  # a folder named like a NIfTI file would pass for a map
    assert "explain writes a folder" in capsys.readouterr().err and not (tmp_path / "map.nii.gz").exists()


def embedding_columns(path: Path) -> dict[str, list]:
    """A table from neurox embed, column by column, from Parquet or TSV (whose embedding values are read as numbers)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pydict()
    rows = read_tsv(path)
    return {key: [float(r[key]) if key[0] == "e" and key[1:].isdigit() else r[key] for r in rows] for key in rows[0]}


def test_embed_a_trained_run(short, trained, tmp_path, capsys):
    (_, store), run = short, trained
    table = tmp_path / "emb.parquet"
    assert main(["embed", str(run), "--store", str(store), "--out", str(table), "--color_by", "amplitude_group",
                 "--quiet", "true"]) == 0
    participants = embedding_columns(table)
    assert participants["participant_id"] == [f"sub-{i:02d}" for i in range(1, 9)]
    assert set(participants["split"]) <= {"train", "val", "test"} and "amplitude_group" in participants
    windows = embedding_columns(tmp_path / "emb_windows.parquet")
    assert len(windows["participant_id"]) == 8 * 2  # 40 frames: 2 windows of 20 each
    first = np.array([windows[f"e{i}"][0] for i in range(96)])
    mean = np.mean([[windows[f"e{i}"][w] for i in range(96)] for w in range(2)], axis=0)
    assert np.allclose([participants[f"e{i}"][0] for i in range(96)], mean, atol=1e-5) and first.std() > 0
    assert (tmp_path / "emb_pca.png").stat().st_size > 5_000
    assert not (tmp_path / ".emb.parquet.parts").exists()  # the embeddings it kept go once the tables are written
    # an interrupted embed resumes from the participants it kept; what another model or store left is discarded
    from neurox.analysis.embed import _save_participant
    from neurox.hub import weights_digest
    from neurox.io.claim import kept_parts

    settings = {"model": weights_digest(run), "store": str(Path(store).resolve())}
    # the stale one is also written as TSV, with its progress shown
    for out, kept_settings in ((tmp_path / "resumed.parquet", settings),
                               (tmp_path / "stale.tsv", {**settings, "model": "another"})):
        cache = kept_parts(out, kept_settings)
        rows = [(r, s) for r, s in zip(windows["run_id"][:2], windows["start"][:2])]  # sub-01's windows, marked
        marked = np.array([[windows[f"e{i}"][w] + 1.0 for i in range(96)] for w in range(2)], dtype=np.float32)
        _save_participant(cache / "sub-01.npz", rows, marked)
        quiet = ["--quiet", "true"] if out.suffix == ".parquet" else []
        assert main(["embed", str(run), "--store", str(store), "--out", str(out), *quiet]) == 0 and not cache.exists()
        again = embedding_columns(out)
        shift = np.array([again[f"e{i}"][0] - participants[f"e{i}"][0] for i in range(96)])
        assert np.allclose(shift, 1.0 if out.stem == "resumed" else 0.0, atol=1e-5)  # read, or discarded
        for i in range(96):  # the others: the same (TSV keeps six significant digits)
            assert np.allclose(again[f"e{i}"][1:], participants[f"e{i}"][1:], rtol=1e-5, atol=1e-7), i
    shown = capsys.readouterr().err  # progress as whole lines in a log, not carriage-return redraws
    assert "embed: 8/8 (100%) participant" in shown and "windows 16" in shown and "\r" not in shown
    assert read_tsv(tmp_path / "stale.tsv")[0]["participant_id"] == "sub-01"


def test_probe_a_trained_run(short, trained, tmp_path, capsys):
    """The closed-form probe of the same run, on its own split, with statistics pooling; it resumes from the
    embeddings it kept, never mixes settings, and reads a stage's per-position output."""
    (_, store), run = short, trained
    assert main(["probe", str(run), "--store", str(store), "--target", "amplitude_group", "--split_from", str(run),
                 "--pool", "mean_std", "--out", str(tmp_path / "probe")]) == 0
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert metrics["pool"] == "mean_std" and 0.0 <= metrics["test"]["auroc"] <= 1.0
    assert read_tsv(tmp_path / "probe" / "splits.tsv") == read_tsv(run / "splits.tsv")
    assert "probe: embedding: 8/8 (100%) participant" in capsys.readouterr().err
    # the same probe again recomputes it; one of other settings, or another command, never writes over it
    same = ["probe", str(run), "--store", str(store), "--target", "amplitude_group", "--split_from", str(run),
            "--pool", "mean_std", "--out", str(tmp_path / "probe"), "--quiet", "true"]
    assert main(same) == 0
    assert json.loads((tmp_path / "probe" / "metrics.json").read_text()) == metrics
    assert main(same[:-6] + ["--pool", "mean", "--seed", "1", "--out", str(tmp_path / "probe")]) == 1
    assert (f"{tmp_path / 'probe'} holds the outputs of neurox probe with other settings (seed, pool differ); "
            "choose another --out") in capsys.readouterr().err
    # an interrupted probe resumes from the embeddings it kept in --out: the same metrics, from what it kept
    from neurox.analysis.embed import load_model
    from neurox.analysis.probe import participant_embeddings

    model, _ = load_model(run)
    regression = ["probe", str(run), "--store", str(store), "--target", "lowfreq_score", "--split_from", str(run),
                  "--quiet", "true", "--out"]
    assert main([*regression, str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole" / ".embeddings").exists()  # gone once the metrics are written
    for name, change in (("resumed", False), ("marked", True)):
        kept = tmp_path / name / ".embeddings"
        vectors = participant_embeddings(model.eval(), Store(store), ["sub-01", "sub-02", "sub-03"], cache=kept)
        if change:  # marks what is read: a resumed probe reads the kept embedding, not a new one
            np.save(kept / "sub-01.npy", vectors["sub-01"] + 1.0)
        assert main([*regression, str(tmp_path / name)]) == 0 and not kept.exists()
    whole, resumed, marked = (json.loads((tmp_path / n / "metrics.json").read_text())["test"]["mae"]
                              for n in ("whole", "resumed", "marked"))
    assert resumed == whole != marked
    assert main(["connectivity", "--store", str(store), "--atlas", str(tmp_path / "none.nii.gz"), "--out",
                 str(tmp_path / "probe")]) == 1  # a wrong atlas is said first: the folder is not claimed yet
    assert "none.nii.gz: no such atlas file" in capsys.readouterr().err
    assert json.loads((tmp_path / "probe" / "metrics.json").read_text()) == metrics
    # and per last-stage position
    assert main(["probe", str(run), "--store", str(store), "--target", "amplitude_group", "--split_from", str(run),
                 "--pool", "tokens", "--out", str(tmp_path / "probe-tokens")]) == 0
    metrics = json.loads((tmp_path / "probe-tokens" / "metrics.json").read_text())
    assert metrics["pool"] == "tokens" and metrics["stage"] == 3 and 0.0 <= metrics["test"]["auroc"] <= 1.0
    # and per position of an earlier, finer stage: 4 x 4 x 4 positions of 48 channels in the demo model
    assert main(["probe", str(run), "--store", str(store), "--target", "amplitude_group", "--split_from", str(run),
                 "--pool", "tokens", "--stage", "2", "--out", str(tmp_path / "probe-stage-2")]) == 0
    metrics = json.loads((tmp_path / "probe-stage-2" / "metrics.json").read_text())
    assert metrics["stage"] == 2 and 0.0 <= metrics["test"]["auroc"] <= 1.0
    vectors = participant_embeddings(model.eval(), Store(store), ["sub-01"], pool="tokens", stage=2)
    assert vectors["sub-01"].shape == (2 * 48 * 4**3,)
    assert main(["probe", str(run), "--store", str(store), "--target", "amplitude_group", "--stage", "4"]) == 1
    assert "--stage 4" in capsys.readouterr().err


def test_participant_vector_pools_every_frame_of_every_window():
    from neurox.analysis.embed import participant_vector

    series = np.random.default_rng(0).normal(size=(2, 3, 4))  # 2 windows, 3 channels, 4 frames
    assert np.allclose(participant_vector(series, "mean"), series.mean(axis=(0, 2)))
    pooled = participant_vector(series, "mean_std")
    assert pooled.shape == (6,) and np.allclose(pooled[:3], series.mean(axis=(0, 2)))
    assert np.allclose(pooled[3:], [np.concatenate([series[0, c], series[1, c]]).std() for c in range(3)])
    with pytest.raises(ValueError, match="unknown pool"):
        participant_vector(series, "max")
    with pytest.raises(ValueError, match="per-position"):
        participant_vector(series, "tokens")

    # per position (2 windows, 3 channels, 5 positions, 4 frames): mean and mean_std average over space
    # first; tokens keeps each position
    positions = np.random.default_rng(1).normal(size=(2, 3, 5, 4))
    for pool in ("mean", "mean_std"):
        assert np.allclose(participant_vector(positions, pool), participant_vector(positions.mean(2), pool))
    tokens = participant_vector(positions, "tokens")
    assert tokens.shape == (2 * 3 * 5,)
    assert np.allclose(tokens[:15].reshape(3, 5), positions.mean(axis=(0, 3)))
    assert np.isclose(tokens[15 + 5 * 2 + 3], np.concatenate([positions[0, 2, 3], positions[1, 2, 3]]).std())


def matrices_of(store: Store, atlas, participants: list[str], **options) -> tuple[dict, list[int]]:
    """Participant -> connectivity matrix, all in memory, and the atlas labels."""
    from neurox.data.loader import prepared_runs

    grid, labels = store_atlas(store, atlas)
    runs, _ = prepared_runs(store, participants)
    return dict(participant_matrices(store, grid, labels, runs, progress=False, **options)), labels


def test_connectivity_resumes_from_the_series_it_kept(synthetic, tmp_path):
    cohort, store = synthetic
    atlas = atlas_of(cohort)
    whole = tmp_path / "whole"
    assert main(["connectivity", "--store", str(store), "--atlas", str(atlas), "--out", str(whole),
                 "--quiet", "true"]) == 0
    assert not list(whole.glob(".series-*"))  # the kept series go once the outputs are written
    # an interrupted run: the series of the first three participants were kept before it stopped
    resumed = tmp_path / "resumed"
    grid, _ = store_atlas(Store(store), atlas)
    cache = resumed / f".series-{hashlib.sha256(grid.tobytes()).hexdigest()[:12]}"
    matrices_of(Store(store), atlas, ["sub-01", "sub-02", "sub-03"], cache=cache)
    kept = sorted(cache.glob("*.npy"))
    assert len(kept) == 3
    np.save(kept[0], np.random.default_rng(0).standard_normal(np.load(kept[0]).shape))  # marks what is read
    assert main(["connectivity", "--store", str(store), "--atlas", str(atlas), "--out", str(resumed),
                 "--quiet", "true"]) == 0
    a, b = np.load(whole / "connectivity.npz"), np.load(resumed / "connectivity.npz")
    # the kept series were read, not recomputed; the rest equal the uninterrupted run exactly
    assert not np.allclose(a["matrices"][0], b["matrices"][0]) and list(b["participants"][:1]) == ["sub-01"]
    assert np.array_equal(a["matrices"][1:], b["matrices"][1:]) and not cache.exists()


def test_connectivity_never_mixes_outputs_of_other_settings(synthetic, tmp_path, capsys):
    """Edge tests of a --group_by run would stay beside the matrices of a later run without it; such a run, or
    another command, is refused in one line, and the same settings recompute the outputs."""
    cohort, store = synthetic
    atlas, out = atlas_of(cohort), tmp_path / "fc"
    grouped = ["connectivity", "--store", str(store), "--atlas", str(atlas), "--out", str(out), "--quiet", "true",
               "--group_by", "coupling_group"]
    assert main(grouped) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix != ".png"}
    assert "edges.tsv" in before
    assert main(grouped[:-2] + ["--kind", "plain"]) == 1
    assert (f"{out} holds the outputs of neurox connectivity with other settings (kind, group_by differ); "
            "choose another --out") in capsys.readouterr().err
    assert {p: (out / p).read_bytes() for p in before} == before
    assert main(["baseline", "--store", str(store), "--target", "coupling_group", "--atlas", str(atlas),
                 "--out", str(out)]) == 1
    assert f"{out} holds the outputs of neurox connectivity; choose another --out" in capsys.readouterr().err
    relative = Path(os.path.relpath(store))  # the same store named another way is the same setting
    assert main(grouped[:2] + [str(relative)] + grouped[3:]) == 0
    assert {p: (out / p).read_bytes() for p in before} == before


def test_explain_chooses_participants_by_phenotype(synthetic):
    from neurox.analysis.explain import choose_participants

    _, store = synthetic
    table = {r["participant_id"]: r for r in read_tsv(Path(store) / "participants.tsv")}
    chosen = choose_participants(Store(store), {}, None, None, "coupling_group=1")
    assert chosen == sorted(p for p, r in table.items() if r["coupling_group"] == "1") and len(chosen) == 4
    with pytest.raises(ValueError, match="--where 'site=1': expected COLUMN=VALUE with a column of"):
        choose_participants(Store(store), {}, None, None, "site=1")


def test_a_folder_claimed_by_a_run_that_wrote_nothing_is_free(tmp_path):
    from neurox.io.claim import claim_folder

    claim_folder(tmp_path / "out", "probe", {"pool": "mean"})  # the run then failed before writing anything
    claim_folder(tmp_path / "out", "connectivity", {"kind": "plain"})
    (tmp_path / "out" / "connectivity.npz").write_bytes(b"")
    claim_folder(tmp_path / "out", "connectivity", {"kind": "plain"})
    with pytest.raises(ValueError, match="other settings \\(kind differ\\)"):
        claim_folder(tmp_path / "out", "connectivity", {"kind": "tangent"})
    with pytest.raises(ValueError, match="holds the outputs of neurox connectivity; choose another --out"):
        claim_folder(tmp_path / "out", "probe", {"pool": "mean"})


def test_connectivity_writes_what_it_computes_one_participant_at_a_time(synthetic, tmp_path):
    """The outputs are streamed from an on-disk table of edges; they equal the matrices computed in memory."""
    cohort, store = synthetic
    atlas = atlas_of(cohort)
    ids = ["sub-02", "sub-05", "sub-07"]
    assert main(["connectivity", "--store", str(store), "--atlas", str(atlas), "--out", str(tmp_path / "fc"),
                 "--kind", "plain", "--participants", *ids, "--quiet", "true"]) == 0
    data = np.load(tmp_path / "fc" / "connectivity.npz")
    reference, labels = matrices_of(Store(store), atlas, ids, kind="plain")
    assert list(data["participants"]) == ids and list(data["labels"]) == labels
    assert data["matrices"].dtype == np.float32
    assert np.allclose(data["matrices"], np.stack([reference[p] for p in ids]), atol=1e-6)
    assert np.allclose(data["group_mean"], np.mean([reference[p] for p in ids], axis=0), atol=1e-6)
    series = np.load(tmp_path / "fc" / "parcel_series.npz")
    runs = sorted(k for k in series.files if k != "labels")
    assert [run.split("_")[0] for run in runs] == ids and series[runs[0]].shape == (200, 40)
    grid, _ = store_atlas(Store(store), atlas)  # each parcel's series: the mean of its in-brain voxels
    reader, mask = Store(store).run(runs[0]), Store(store).mask(runs[0])
    frames = reader.read(0, reader.n_frames).astype(np.float64)
    expected = np.stack([frames[:, mask & (grid == label)].mean(1) for label in labels], axis=1)
    assert np.allclose(series[runs[0]], np.nan_to_num(expected), rtol=1e-5, atol=1e-5)
    # neither the kept series nor the table of edges is left; only the record of what the folder holds
    assert [p.name for p in (tmp_path / "fc").glob(".*")] == [".neurox-outputs.json"]
    # in worker processes: the same outputs, in the same order
    assert main(["connectivity", "--store", str(store), "--atlas", str(atlas), "--out", str(tmp_path / "fc2"),
                 "--kind", "plain", "--participants", *ids, "--workers", "2", "--quiet", "true"]) == 0
    pooled = np.load(tmp_path / "fc2" / "connectivity.npz")
    assert list(pooled["participants"]) == ids and np.array_equal(pooled["matrices"], data["matrices"])
    pooled_series = np.load(tmp_path / "fc2" / "parcel_series.npz")
    assert all(np.array_equal(pooled_series[run], series[run]) for run in runs)


def test_tangent_space_equals_nilearns():
    """Shrunk covariance of the z-scored series, the geometric mean, and each matrix's logarithm at it: what
    nilearn's ConnectivityMeasure(kind="tangent") gives for the same standardised series."""
    from nilearn.connectome import ConnectivityMeasure

    from neurox.analysis.tangent import geometric_mean, shrunk_correlation, tangent_matrix, whitening

    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((6, 6))
    series = [rng.standard_normal((40, 6)) @ (mixing + np.diag(rng.uniform(1, 3, 6))) for _ in range(7)]
    standardised = [(s - s.mean(0)) / s.std(0, ddof=1) for s in series]
    measure = ConnectivityMeasure(kind="tangent", standardize=False)
    expected = measure.fit_transform(standardised)
    matrices = [shrunk_correlation(s) for s in series]
    reference = geometric_mean(matrices)
    assert np.allclose(reference, measure.mean_, atol=1e-6)
    for matrix, theirs in zip(matrices, expected):
        assert np.allclose(tangent_matrix(matrix, whitening(reference)), theirs, atol=1e-5)
    assert np.allclose(tangent_matrix(reference, whitening(reference)), 0.0, atol=1e-10)  # the origin
    flat = np.column_stack([series[0], np.zeros(40)])  # a parcel without voxels: unit variance, no covariance
    assert shrunk_correlation(flat)[-1].tolist() == [0.0] * 6 + [1.0]


def test_connectivity_in_the_tangent_space(synthetic, tmp_path):
    from neurox.analysis.tangent import geometric_mean, shrunk_correlation, tangent_matrix, whitening

    cohort, store = synthetic
    ids = ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert main(["connectivity", "--store", str(store), "--atlas", str(atlas_of(cohort)), "--out", str(tmp_path),
                 "--kind", "tangent", "--participants", *ids, "--quiet", "true"]) == 0
    data, series = np.load(tmp_path / "connectivity.npz"), np.load(tmp_path / "parcel_series.npz")
    shrunk = [shrunk_correlation(series[next(k for k in series.files if k.startswith(p))].astype(np.float64))
              for p in ids]  # one run each
    reference = geometric_mean(shrunk)
    assert np.allclose(data["tangent_reference"], reference, atol=1e-5)
    expected = np.stack([tangent_matrix(m, whitening(reference)) for m in shrunk])
    assert np.allclose(data["matrices"], expected, atol=1e-4) and str(data["kind"]) == "tangent"
    assert np.abs(data["group_mean"]).max() < 1e-4  # at the geometric mean, the deviations average to zero


def test_matrix_table_reads_some_rows_and_transforms_in_place(tmp_path):
    """The tangent space's two needs of the on-disk table: the training participants' matrices, read again at
    each step of their mean without a copy; and every matrix replaced by its projection, with no second table."""
    from neurox.analysis.matrix_table import MatrixTable

    rng = np.random.default_rng(0)
    matrices = [m + m.T for m in rng.standard_normal((5, 4, 4))]
    table = MatrixTable(tmp_path / "t", 4)
    with table.appending() as append:
        for matrix in matrices:
            append(matrix)
    some = table.rows([3, 1])
    assert len(some) == 2
    for _ in range(2):  # iterated again: read again
        assert np.allclose(np.stack(list(some)), np.stack([matrices[3], matrices[1]]), atol=1e-6)
    sizes = sorted(f.stat().st_size for f in tmp_path.iterdir())
    table.transform(lambda m: m @ m)
    assert np.allclose(np.stack(list(table)), np.stack([m @ m for m in matrices]), rtol=1e-5, atol=1e-5)
    assert sorted(f.stat().st_size for f in tmp_path.iterdir()) == sizes  # the same two files, rewritten


def test_tangent_table_in_worker_processes_is_the_same(tmp_path):
    """tangent_table splits each pass (the mean's steps, the projection) over processes that read and write their
    own rows of the table: the same reference and projections as in one process; the reference is the mean of
    the rows asked for only."""
    from neurox.analysis.matrix_table import MatrixTable
    from neurox.analysis.tangent import geometric_mean, shrunk_correlation, tangent_matrix, tangent_table, whitening

    rng = np.random.default_rng(3)
    matrices = [shrunk_correlation(rng.standard_normal((30, 5)) @ rng.standard_normal((5, 5))) for _ in range(9)]
    tables = {}
    for workers in (1, 2):
        tables[workers] = table = MatrixTable(tmp_path / f"w{workers}", 5)
        with table.appending() as append:
            for matrix in matrices:
                append(matrix)
        reference = tangent_table(table, reference_rows=[0, 2, 4, 6], workers=workers)
        expected = geometric_mean([np.float32(matrices[i]).astype(np.float64) for i in (0, 2, 4, 6)])
        assert np.allclose(reference, expected, atol=1e-10)
        projected = np.stack([tangent_matrix(np.float32(m).astype(np.float64), whitening(expected)) for m in matrices])
        assert np.allclose(np.stack(list(table)), projected, atol=1e-6)
    assert np.allclose(np.stack(list(tables[1])), np.stack(list(tables[2])), atol=1e-6)


def test_npz_writer_streams_rows_and_writes_nothing_on_error(tmp_path):
    from neurox.io.npz import npz_writer

    rows = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    with npz_writer(tmp_path / "a.npz") as npz:
        npz.add_rows("rows", rows.shape, np.float32, iter(rows))
        npz.add("names", np.array(["x", "y"]))
    data = np.load(tmp_path / "a.npz")
    assert np.array_equal(data["rows"], rows) and list(data["names"]) == ["x", "y"]
    with pytest.raises(ValueError, match="3 rows written for a first axis of 4"):
        with npz_writer(tmp_path / "b.npz") as npz:
            npz.add_rows("rows", rows.shape, np.float32, iter(rows[:3]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]  # no partial file, no temporary left


def test_edgewise_statistics_adjust_for_covariates_and_correct_for_many_edges():
    from scipy import stats

    from neurox.analysis.edges import benjamini_hochberg, edge_design, edge_tests

    rng = np.random.default_rng(0)
    n = 60
    group = np.repeat([0, 1], n // 2)
    motion = group + rng.normal(0, 0.5, n)  # the second group moves more
    edges = np.column_stack([3.0 * motion + rng.normal(0, 0.5, n),  # follows motion only
                             1.0 * group + rng.normal(0, 0.5, n)])  # a real group difference
    values = [str(g) for g in group]
    alone = edge_tests(edges, edge_design(values, {})[0])
    design, kept, coding, groups = edge_design(values + ["n/a"], {"mean_fd": [f"{m}" for m in motion] + ["0.1"]})
    adjusted = edge_tests(edges, design)
    assert (coding, groups, kept) == ("two groups: 1 vs 0", ["0", "1"], list(range(n)))  # the row without a group
    assert alone["p"][0] < 1e-3 and adjusted["p"][0] > 0.01  # the motion-driven edge is explained by motion
    assert adjusted["p"][1] < 1e-3 and adjusted["beta"][1] == pytest.approx(1.0, abs=0.25)
    # a numeric column: the slope per unit
    slope = edge_tests(2.0 * motion[:, None] + rng.normal(0, 0.1, (n, 1)), edge_design([f"{m}" for m in motion], {})[0])
    assert slope["beta"][0] == pytest.approx(2.0, abs=0.05)
    p = rng.uniform(0, 0.1, 50)
    assert np.allclose(benjamini_hochberg(p), stats.false_discovery_control(p))
    with pytest.raises(ValueError, match="need two groups or a numeric column; found 3 values"):
        edge_design(["a", "b", "c"], {})


def test_edgewise_statistics_compare_groups_within_the_sites_of_a_label_covariate():
    from neurox.analysis.edges import edge_design, edge_tests

    rng = np.random.default_rng(2)
    n = 90
    site = np.array(["a", "b", "c"] * (n // 3))
    group = (rng.uniform(size=n) < np.select([site == "a", site == "b"], [0.8, 0.5], 0.2)).astype(int)  # unbalanced
    shift = np.select([site == "a", site == "b"], [2.0, 0.0], -2.0)
    edges = np.column_stack([shift + rng.normal(0, 0.5, n),  # a site effect only
                             shift + 1.0 * group + rng.normal(0, 0.5, n)])  # and a group difference
    values = [str(g) for g in group]
    alone = edge_tests(edges, edge_design(values, {})[0])
    design, kept, _, _ = edge_design(values + ["1"], {"site": [*site, "n/a"]})  # the row without a site goes
    within = edge_tests(edges, design)
    assert kept == list(range(n)) and design.shape == (n, 4)  # intercept, group, site b, site c
    assert alone["p"][0] < 1e-3 and within["p"][0] > 0.01  # the site-driven edge is explained by the sites
    indicators = np.column_stack([np.ones(n), group, site == "b", site == "c"]).astype(float)
    assert within["beta"][1] == pytest.approx(np.linalg.lstsq(indicators, edges[:, 1], rcond=None)[0][1])
    se = within["beta"][1] / within["t"][1]
    assert abs(within["beta"][1] - 1.0) < 4 * se and within["p"][1] < 1e-3
    with pytest.raises(ValueError, match=r"the effect \(two groups: 1 vs 0\) cannot be told apart from the "
                                         r"covariates \(site\)"):
        edge_design(values, {"site": [f"s{g}" for g in group]})  # each site holds one group


def test_edgewise_statistics_are_the_same_in_slices_of_edges(tmp_path):
    from neurox.analysis.edges import pair_statistics

    rng = np.random.default_rng(1)
    edges = rng.normal(size=(12, 36))
    pairs = [(f"p{k}", f"p{k + 1}") for k in range(36)]
    test = {"values": [str(k % 2) for k in range(12)], "covariates": {"age": [str(k) for k in range(12)]},
            "subjects": [f"sub-{k}" for k in range(12)]}
    whole, per_edge = pair_statistics(lambda lo, hi: edges[:, lo:hi], pairs, tmp_path / "whole.tsv", **test)
    sliced, per_slice = pair_statistics(lambda lo, hi: edges[:, lo:hi], pairs, tmp_path / "sliced.tsv", chunk=5,
                                        **test)  # 36 edges in 8 slices
    assert (tmp_path / "whole.tsv").read_text() == (tmp_path / "sliced.tsv").read_text()
    assert np.array_equal(per_edge["q"], per_slice["q"]) and whole == sliced and whole["edges"] == 36


def test_permuted_t_is_the_refit_of_freedman_lanes_permuted_data():
    """Each permutation's t, computed without a refit, is the full model's t on the covariates' fit plus the
    permuted residuals (Freedman & Lane), covariates of both kinds included."""
    from neurox.analysis.edges import edge_design, edge_tests
    from neurox.analysis.nbs import PermutedT

    rng = np.random.default_rng(3)
    n = 30
    design = edge_design([str(k % 2) for k in range(n)], {"age": [str(a) for a in rng.normal(40, 9, n)],
                                                          "site": ["abc"[k % 3] for k in range(n)]})[0]
    edges = rng.normal(size=(n, 25)) + design[:, 2:3]
    permutations = np.stack([np.arange(n), *(rng.permutation(n) for _ in range(7))])
    t = PermutedT(design, permutations).t(edges)
    nuisance = np.delete(design, 1, axis=1)
    fitted = nuisance @ np.linalg.lstsq(nuisance, edges, rcond=None)[0]
    for row, order in zip(t, permutations):
        assert np.allclose(row, edge_tests(fitted + (edges - fitted)[order], design)["t"], atol=1e-10)


def test_network_based_statistic_equals_bctpys():
    """Given bctpy's permutations, the null distribution of the largest component (one-sided, as bctpy's
    tail='right') and the observed components are bctpy's nbs_bct's, edge for edge."""
    import bct

    from neurox.analysis.nbs import PermutedT, components, largest_null

    rng = np.random.default_rng(1)
    size, nx, ny, k = 16, 12, 14, 60
    i, j = np.triu_indices(size, k=1)
    x, y = rng.normal(size=(nx, len(i))), rng.normal(size=(ny, len(i)))
    x[:, (i < 6) & (j < 6)] += 1.2  # a component among parcels 0-5, stronger in the first group

    def stack(edges):
        out = np.zeros((size, size, len(edges)))
        for s, row in enumerate(edges):
            out[i, j, s] = out[j, i, s] = row
        return out

    with contextlib.redirect_stdout(io.StringIO()):  # bctpy prints its progress
        _, adjacency, null = bct.nbs_bct(stack(x), stack(y), thresh=2.0, k=k, tail="right", seed=7)
    state = np.random.RandomState(7)  # the permutations bctpy drew, in its order
    permutations = np.stack([state.permutation(nx + ny) for _ in range(k)])
    design = np.column_stack([np.ones(nx + ny), np.r_[np.ones(nx), np.zeros(ny)]])  # x is the group tested
    edges = np.vstack([x, y])
    t = PermutedT(design, np.arange(nx + ny)[None]).t(edges)[0]
    permuted = PermutedT(design, permutations).t(edges)
    signs = (permuted > 2.0).astype(np.int8) - (permuted < -2.0).astype(np.int8)
    assert np.array_equal(largest_null(signs, i, j, size)[:, 0], null.astype(int))
    label, sizes = components(t > 2.0, i, j, size)
    ours = {frozenset(np.flatnonzero(label == c)) for c in range(len(sizes))}
    theirs = {frozenset(np.flatnonzero(adjacency[i, j] == c)) for c in range(1, int(adjacency.max()) + 1)}
    assert ours == theirs and sizes[0] >= 10


def test_network_based_statistic_holds_its_error_rate_and_finds_a_planted_component():
    from neurox.analysis.edges import edge_design
    from neurox.analysis.nbs import NBSOptions, PermutedT, network_based_statistic, permutations

    size, n = 12, 24
    i, j = np.triu_indices(size, k=1)
    design = edge_design([str(k % 2) for k in range(n)], {})[0]
    rng = np.random.default_rng(4)

    def smallest_p(shift: float, seed: int) -> float:
        edges = rng.normal(size=(n, len(i)))
        edges[design[:, 1] == 1] += shift * ((i < 5) & (j < 5))  # 10 edges among parcels 0-4
        t = PermutedT(design, np.arange(n)[None]).t(edges)[0]
        permuted = PermutedT(design, permutations(n, NBSOptions(2.5, 99, seed))).t(edges)
        signs = (permuted > 2.5).astype(np.int8) - (permuted < -2.5).astype(np.int8)
        found = network_based_statistic(t, signs, 2.5, i, j, size)[0]
        return min((c["p_fwe"] for c in found), default=1.0)

    false = sum(smallest_p(0.0, seed) < 0.05 for seed in range(40))
    assert false <= 6  # at 5%, 2 of 40 expected; 7 or more has probability 0.003
    assert all(smallest_p(1.5, seed) < 0.05 for seed in range(5))


def test_networks_come_from_a_network_column_or_schaefer_names(tmp_path):
    from neurox.analysis.connectivity import atlas_networks

    (tmp_path / "schaefer.tsv").write_text("index\tname\n1\t7Networks_LH_Vis_1\n2\t7Networks_RH_Vis_1\n"
                                           "3\t7Networks_LH_Default_PFC_1\n")
    assert atlas_networks(tmp_path / "atlas.nii.gz", [1, 2, 3], tmp_path / "schaefer.tsv") == ["Vis", "Vis", "Default"]
    (tmp_path / "plain.tsv").write_text("index\tname\n1\tV1\n2\tV2\n3\tPFC\n")
    assert atlas_networks(tmp_path / "atlas.nii.gz", [1, 2, 3], tmp_path / "plain.tsv") is None  # no networks
    (tmp_path / "own.tsv").write_text("index\tname\tnetwork\n1\tV1\tvisual\n2\tV2\tvisual\n3\tPFC\tfrontal\n")
    assert atlas_networks(tmp_path / "atlas.nii.gz", [1, 2, 3], tmp_path / "own.tsv") == ["visual", "visual",
                                                                                          "frontal"]
