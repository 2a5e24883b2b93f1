"""The linear models beside the deep one: the FC baseline and the closed-form probe, their fits, covariate removal,
ComBat harmonisation and k-fold cross-validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fakes import cohort_store, finetune_args, three_parcel_atlas

from neurox import api
from neurox.cli import main
from neurox.data.loader import Cohort, infer_target, load_splits
from neurox.data.store import read_tsv


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return cohort_store(tmp_path_factory)


def test_connectivity_compares_groups_within_sites(store, tmp_path, capsys):
    """A label covariate (site a, b, c) enters the edgewise statistics as an indicator per site but the first,
    as it enters the linear models."""
    out = tmp_path / "fc"
    assert main(["connectivity", "--store", str(store), "--atlas", str(three_parcel_atlas(tmp_path)), "--out",
                 str(out), "--group_by", "group", "--covariates", "site", "--quiet", "true"]) == 0
    summary = json.loads((out / "edges.json").read_text())
    assert (summary["covariates"], summary["n"], summary["dof"]) == (["site"], 10, 10 - 4)  # 1, group, site b, c
    assert "edgewise, group (two groups: 1 vs 0; n=10; covariates: site)" in capsys.readouterr().out


def test_connectivity_harmonises_the_sites_before_the_edgewise_statistics(store, tmp_path, capsys):
    """--harmonize site: the edges tested are neuroCombat's, with the group preserved; site cannot also be a
    covariate or the effect."""
    import warnings

    import pandas as pd
    from neuroCombat import neuroCombat

    from neurox.analysis.edges import edge_tests

    out, atlas = tmp_path / "fc", three_parcel_atlas(tmp_path)
    base = ["connectivity", "--store", str(store), "--atlas", str(atlas), "--group_by", "group", "--quiet", "true"]
    assert main([*base, "--out", str(out), "--harmonize", "site"]) == 0
    summary = json.loads((out / "edges.json").read_text())
    assert (summary["harmonize"], summary["n"], summary["dof"]) == ("site", 10, 10 - 2)
    assert "edgewise, group (two groups: 1 vs 0; n=10; covariates: none; ComBat across site)" in capsys.readouterr().out
    data = np.load(out / "connectivity.npz")
    phenotypes = {r["participant_id"]: r for r in read_tsv(out / "participants.tsv")}
    covars = pd.DataFrame([{k: phenotypes[p][k] for k in ("site", "group")} for p in data["participants"]])
    upper = np.triu_indices(3, 1)
    edges = data["matrices"][:, upper[0], upper[1]].astype(np.float64)  # the matrices are written as computed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = neuroCombat(edges.T.copy(), covars, "site", categorical_cols=["group"])["data"].T
    design = np.column_stack([np.ones(10), covars["group"].astype(float)])
    expected = edge_tests(theirs, design)["t"]
    rows = {(r["parcel_a"], r["parcel_b"]): float(r["t"]) for r in read_tsv(out / "edges.tsv")}
    names = [r["name"] for r in read_tsv(out / "parcels.tsv")]
    got = [rows[(names[a], names[b])] for a, b in zip(*upper)]
    assert np.allclose(got, expected, atol=1e-3)
    for extra, message in ((["--covariates", "site"], "--harmonize site: ComBat removes the effect of site; it "
                                                      "cannot also be a covariate"),
                           (["--group_by", "site"], "it cannot also be the effect tested"),
                           (["--group_by", "group", "--harmonize", "nope"], "--harmonize nope: not a column of")):
        harmonize = [] if "--harmonize" in extra else ["--harmonize", "site"]
        assert main([*base, "--out", str(tmp_path / "x"), *harmonize, *extra]) == 1
        assert message in capsys.readouterr().err


def test_cross_validation_fits_every_fold_on_the_others_only():
    """Each participant's output is that of the model fitted, sites harmonised and covariates removed, on the other
    folds alone; the pooled metrics, each fold's, and the brain-age gap corrected by the other folds' line."""
    from neurox.analysis.baseline import fit_linear, linear_outputs
    from neurox.analysis.covariates import Adjustment, CovariateRemoval
    from neurox.analysis.crossval import cross_validate
    from neurox.analysis.harmonize import Harmonisation
    from neurox.data.loader import fold_participants, standardise

    rng = np.random.default_rng(0)
    ids = [f"sub-{i:03d}" for i in range(90)]
    age = rng.uniform(20, 80, 90)
    site, sex = rng.choice(["a", "b"], 90), rng.choice(["f", "m"], 90)
    x = rng.standard_normal((90, 40)).astype(np.float32)
    x[:, :5] += (age[:, None] - 50) / 10 + (site == "b")[:, None] * 3.0 + (sex == "m")[:, None]
    x[site == "b"] *= 2
    values = {p: [f"{a:.3f}"] for p, a in zip(ids, age)}
    cohort = Cohort([infer_target("age", [v[0] for v in values.values()])], ids, values, {p: [p] for p in ids}, {})
    folds = fold_participants(cohort, seed=0, folds=3)
    cohort.split = dict.fromkeys(ids, "train")
    standardise(cohort)
    adjustment = Adjustment(["sex"], {p: [v] for p, v in zip(ids, sex)}, "site", {p: [v] for p, v in zip(ids, site)})
    seen = []

    def features_for(train):
        seen.append(sorted(train))
        return ids, x

    results, rows = cross_validate(cohort, folds, features_for, adjustment, 0, 50, None, "test", False)
    assert [len(t) for t in seen] == [sum(f != k for f in folds.values()) for k in (1, 2, 3)]
    assert set(results) == {"cv", "cv_mean", "cv_fold1", "cv_fold2", "cv_fold3"} and results["cv"]["n_subjects"] == 90
    folds_r = [results[f"cv_fold{k}"]["pearson_r"] for k in (1, 2, 3)]
    assert results["cv_mean"]["pearson_r"] == pytest.approx(np.mean(folds_r))
    assert results["cv_mean"]["pearson_r_sd"] == pytest.approx(np.std(folds_r))
    assert results["cv"]["pearson_r"] > 0.8 and "pearson_r_ci_low" in results["cv"] and "pearson_r_p" in results["cv"]
    assert "pearson_r_ci_low" not in results["cv_fold1"] and results["cv_fold1"]["n_subjects"] == len(rows) // 3
    by_id = {r["participant_id"]: r for r in rows}
    for k in (1, 2, 3):
        train = [i for i, p in enumerate(ids) if folds[p] != k]
        test = [i for i, p in enumerate(ids) if folds[p] == k]
        x_train, x_test = x[train].copy(), x[test].copy()
        harmonisation = Harmonisation.fit("site", [site[i] for i in train], x_train)
        harmonisation.apply([site[i] for i in test], x_test)
        removal = CovariateRemoval.fit(["sex"], [[sex[i]] for i in train], x_train)
        removal.remove([[sex[i]] for i in test], x_test)
        y = np.array([cohort.labels(ids[i])[0] for i in train])
        expected = linear_outputs(fit_linear(x_train, y, "regression", 0), x_test)[:, 0] * cohort.targets[0].std \
            + cohort.targets[0].mean
        assert np.allclose([by_id[ids[i]]["age_predicted"] for i in test], expected, atol=1e-4)
        assert {by_id[ids[i]]["fold"] for i in test} == {k}
        others = [r for r in rows if r["fold"] != k]
        slope, intercept = np.polyfit([float(r["age_true"]) for r in others], [r["age_gap"] for r in others], 1)
        for i in test:
            r = by_id[ids[i]]
            expected_gap = r["age_gap"] - intercept - slope * float(r["age_true"])
            assert r["age_gap_corrected"] == pytest.approx(expected_gap, abs=1e-5)
    assert cohort.targets[0].gap_fit is not None  # the line of every out-of-fold output, for new participants


def test_baseline_and_probe_cross_validated(store, one_epoch_run, tmp_path, capsys):
    """--folds: every participant tested once out of fold (families kept in one fold), the saved model fitted on
    everyone, per fold in the tangent space its own reference."""
    from neurox.analysis.baseline import evaluate_baseline

    atlas = three_parcel_atlas(tmp_path)
    fc = tmp_path / "fc"
    base = ["baseline", "--store", str(store), "--atlas", str(atlas), "--n_boot", "20"]
    assert main([*base, "--target", "score", "--out", str(fc), "--folds", "5", "--split_by", "family",
                 "--quiet", "true"]) == 0
    printed = capsys.readouterr()
    assert "  cv: mae " in printed.out and "  cv_fold5: mae " in printed.out
    assert "folds by family: 2 participants (1 group), 2 participants (1 group)" in printed.err
    metrics = json.loads((fc / "metrics.json").read_text())
    assert set(metrics) == {"cv", "cv_mean", *(f"cv_fold{k}" for k in range(1, 6))}
    assert metrics["cv"]["n_subjects"] == 10 and "pearson_r_p" in metrics["cv"]
    rows = read_tsv(fc / "predictions.tsv")
    assert len(rows) == 10 and {r["split"] for r in rows} == {"cv"} and all(r["score_gap_corrected"] for r in rows)
    fold = {r["participant_id"]: r["fold"] for r in read_tsv(fc / "folds.tsv")}
    assert {r["participant_id"]: r["fold"] for r in rows} == fold
    assert all(fold[f"sub-{2 * k:02d}"] == fold[f"sub-{2 * k + 1:02d}"] for k in range(5))  # siblings together
    assert set(load_splits(fc / "splits.tsv").values()) == {"train"}  # the saved model: fitted on everyone
    assert json.loads((fc / "targets.json").read_text())["targets"][0]["gap_fit"]
    assert evaluate_baseline(fc, store, n_boot=0)["train"]["n_subjects"] == 10
    # the tangent space: each fold's reference is its 5 training participants' mean, the saved model's everyone's
    assert main([*base, "--target", "group", "--out", str(tmp_path / "tangent"), "--folds", "2", "--kind",
                 "tangent"]) == 0
    err = capsys.readouterr().err
    assert err.count("tangent space, the geometric mean of 5 participants: step 1,") == 2
    assert "tangent space, the geometric mean of 10 participants: step 1," in err
    assert main([*base, "--target", "group", "--out", str(tmp_path / "both"), "--folds", "2", "--split_from",
                 str(fc)]) == 1
    assert "--folds cross-validates on folds of its own; it takes no --split_from" in capsys.readouterr().err
    run = one_epoch_run
    assert main(["probe", str(run), "--store", str(store), "--target", "group", "--folds", "3",
                 "--out", str(tmp_path / "probe"), "--quiet", "true"]) == 0
    probed = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert probed["cv"]["n_subjects"] == 10 and "auroc_p" in probed["cv"] and "cv_fold3" in probed
    assert sorted(r["fold"] for r in read_tsv(tmp_path / "probe" / "folds.tsv")) == ["1"] * 4 + ["2"] * 3 + ["3"] * 3


def test_baseline_on_the_same_split(store, one_epoch_run, tmp_path, capsys):
    run = one_epoch_run
    atlas = three_parcel_atlas(tmp_path)
    assert main(["baseline", "--store", str(store), "--target", "group", "--atlas", str(atlas), "--out",
                 str(tmp_path / "fc"), "--split_from", str(run), "--n_boot", "50", "--quiet", "true"]) == 0
    assert read_tsv(tmp_path / "fc" / "splits.tsv") == read_tsv(run / "splits.tsv")
    assert not list((tmp_path / "fc").glob(".series-*"))  # the series it kept to resume are gone once it ends
    import yaml

    environment = yaml.safe_load((tmp_path / "fc" / "config.yaml").read_text())["environment"]
    assert environment["scikit-learn"] and list(environment["stores"]) == [str(store)]
    fc = json.loads((tmp_path / "fc" / "metrics.json").read_text())
    assert fc["test"]["n_subjects"] == json.loads((run / "metrics.json").read_text())["test"]["n_subjects"]
    # the class decision recentred on the validation participants, as fine-tuning does, into the saved intercept
    threshold = json.loads((tmp_path / "fc" / "targets.json").read_text())["targets"][0]["threshold"]
    val = [r for r in read_tsv(tmp_path / "fc" / "predictions.tsv") if r["split"] == "val"]
    medians = [np.median([float(r["group_output"]) for r in val if r["group_true"] == c]) for c in ("0", "1")]
    assert isinstance(threshold, float) and np.mean(medians) == pytest.approx(0, abs=1e-5)
    assert main(["evaluate", str(run), "--store", str(store), "--baseline", str(tmp_path / "fc")]) == 0
    printed = capsys.readouterr()
    assert "connectivity: 10/10 (100%) participant" in printed.err  # the baseline's features, shown
    assert "model_minus_fc_baseline\n  train: accuracy_diff " in printed.out and "auroc_diff " in printed.out
    both = api.evaluate(run, store, baseline=tmp_path / "fc", quiet=True)  # the same participants, paired
    assert "train" in both["model_minus_fc_baseline"]  # (val and test: 2 participants each, too few to compare)
    assert both["fc_baseline"]["test"]["balanced_accuracy"] == fc["test"]["balanced_accuracy"]
    for split, paired in both["model_minus_fc_baseline"].items():
        difference = both["model"][split]["auroc"] - both["fc_baseline"][split]["auroc"]
        assert paired["auroc_diff"] == pytest.approx(difference) and paired["n_subjects"] == 6
    # the same baseline again recomputes it; one of other settings does not overwrite it
    again = ["baseline", "--store", str(store), "--target", "group", "--atlas", str(atlas), "--out",
             str(tmp_path / "fc"), "--split_from", str(run), "--n_boot", "20"]
    assert main(again) == 0
    assert "baseline: fitting 1 cross-validated linear model(s) on " in capsys.readouterr().err
    assert main(again[:-4] + ["--kind", "tangent"]) == 1
    assert (f"{tmp_path / 'fc'} holds the outputs of neurox baseline with other settings (split_from, kind differ)"
            in capsys.readouterr().err)
    assert json.loads((tmp_path / "fc" / "metrics.json").read_text())["test"]["auroc"] == fc["test"]["auroc"]
    # a baseline into a fine-tuning run's folder, or a fine-tuning into a baseline's, would write over its files
    assert main(again[:7] + ["--out", str(run)]) == 1
    assert f"{run} holds the outputs of neurox finetune; choose another --out" in capsys.readouterr().err
    assert main(finetune_args(store, tmp_path / "fc", "--epochs", "1")) == 1
    assert f"{tmp_path / 'fc'} holds the outputs of neurox baseline; choose another --out" in capsys.readouterr().err
    assert json.loads((tmp_path / "fc" / "metrics.json").read_text())["test"]["auroc"] == fc["test"]["auroc"]
    from neurox.data.loader import load_splits, save_splits

    (tmp_path / "no-train").mkdir()  # a split whose training participants are in another store: one line
    save_splits(tmp_path / "no-train" / "splits.tsv", {p: "test" for p in load_splits(run / "splits.tsv")})
    assert main(["baseline", "--store", str(store), "--target", "group", "--atlas", str(atlas), "--out",
                 str(tmp_path / "fc2"), "--split_from", str(tmp_path / "no-train"), "--quiet", "true"]) == 1
    assert "no training participant of the split has a prepared run here (0 in" in capsys.readouterr().err


def test_baseline_of_several_classes_recentres_each_class_on_validation(store, tmp_path):
    """A target of three classes: the saved intercepts are lowered by one offset per class, at which the
    validation participants (one per class here) are given each class with mean probability 1/3."""
    from neurox.data.loader import save_splits

    chosen = tmp_path / "split"  # site a, b, c in turn: every class in every split
    chosen.mkdir()
    save_splits(chosen / "splits.tsv", {f"sub-{i:02d}": "val" if i < 3 else "test" if i < 6 else "train"
                                        for i in range(10)})
    out = tmp_path / "fc-site"
    assert main(["baseline", "--store", str(store), "--target", "site", "--atlas", str(three_parcel_atlas(tmp_path)),
                 "--out", str(out), "--split_from", str(chosen), "--n_boot", "20", "--quiet", "true"]) == 0
    offsets = json.loads((out / "targets.json").read_text())["targets"][0]["threshold"]
    assert len(offsets) == 3 and sum(offsets) == pytest.approx(0, abs=1e-9)
    val = [r for r in read_tsv(out / "predictions.tsv") if r["split"] == "val"]
    shares = np.mean([[float(r[f"site_probability_{c}"]) for c in "abc"] for r in val], axis=0)
    assert sorted(r["site_true"] for r in val) == ["a", "b", "c"] and shares == pytest.approx(1 / 3, abs=1e-5)


def test_paired_difference_of_two_models_on_the_same_participants():
    """Equal outputs differ by nothing (p 1); a better model's lead has an interval above 0; two models of equal
    skill differ at p < 0.05 about one time in twenty."""
    from neurox.train.metrics import auroc, paired_difference

    rng = np.random.default_rng(0)
    labels = np.arange(60) % 2
    good = (labels * 2.0 + rng.standard_normal(60))[:, None]
    weak = (labels * 0.3 + rng.standard_normal(60))[:, None]
    same = paired_difference("binary", labels, good, good, 200)
    assert same["auroc_diff"] == 0 and same["auroc_diff_p"] == 1
    lead = paired_difference("binary", labels, good, weak, 500)
    assert lead["auroc_diff"] == pytest.approx(auroc(labels, good[:, 0]) - auroc(labels, weak[:, 0]))
    assert lead["auroc_diff_ci_low"] > 0 and lead["auroc_diff_p"] < 0.01
    rates = []
    for i in range(100):  # two independent models of the same skill
        y = rng.integers(0, 2, 50)
        first, second = (y + rng.standard_normal((2, 50)) * 1.5)[:, :, None]
        rates.append(paired_difference("binary", y, first, second, 200, seed=i)["auroc_diff_p"] < 0.05)
    assert 0.0 <= np.mean(rates) <= 0.12
    numbers = paired_difference("regression", labels * 1.0, good, weak, 100)
    assert {"mae_diff", "pearson_r_diff_ci_low", "r2_diff_p"} <= set(numbers)


def test_covariate_removal_is_fitted_on_training_rows_and_applied_unchanged():
    from neurox.analysis.covariates import CovariateRemoval

    rng = np.random.default_rng(0)
    n, width = 120, 50
    age, site = rng.uniform(20, 80, n), rng.choice(["a", "b", "c"], n)
    signal = rng.standard_normal((n, width))
    effect = {"a": 0.0, "b": 2.0, "c": -1.0}
    x = (signal + np.outer(age, rng.standard_normal(width)) / 10
         + np.outer([effect[v] for v in site], np.ones(width))).astype(np.float32)
    rows = [[f"{a:.4f}", v] for a, v in zip(age, site)]
    train, held = x[:80].copy(), x[80:].copy()
    removal = CovariateRemoval.fit(["age", "site"], rows[:80], train)
    design = removal.design(rows[:80])
    assert design.shape == (80, 4)  # intercept, age, site b, site c
    assert np.abs(design.T @ train).max() < 1e-2 * np.abs(x[:80]).max() * 80  # no linear trace of age or site left
    assert np.allclose(train, signal[:80] - signal[:80].mean(0), atol=1.5)  # what is left is the signal
    # held-out rows: the training fit, not one of their own
    expected = x[80:] - removal.design(rows[80:]) @ removal.coef
    assert np.allclose(removal.remove(rows[80:], held), expected, atol=1e-4)
    again = CovariateRemoval.from_arrays(removal.arrays())
    assert again.columns == ["age", "site"] and np.allclose(again.coef, removal.coef, atol=1e-5)
    assert again.design([["50", "d"]])[0, 2:].tolist() == [0.0, 0.0]  # a site no training row had: the first's
    with pytest.raises(ValueError, match="--covariates age: 'old' is not a number"):
        removal.design([["old", "a"]])


def test_combat_harmonisation_equals_neurocombat_and_applies_its_training_fit():
    """neuroCombat's parametric empirical Bayes (no preserved covariates), on sites that shift and scale every
    feature differently; new participants harmonised with the training fit, as neuroCombatFromTraining does (its
    formula, written out here: it fails on numpy 2)."""
    import warnings

    from neuroCombat import neuroCombat

    from neurox.analysis.harmonize import Harmonisation

    rng = np.random.default_rng(0)
    n, width = 150, 60
    site = np.array(["a", "b", "c"])[rng.integers(0, 3, n)]
    shift = {"a": 0.0, "b": 1.5, "c": -0.8}
    scale = {"a": 1.0, "b": 2.0, "c": 0.6}
    x = rng.standard_normal((n, width)) * rng.uniform(0.5, 2, width) + rng.uniform(-1, 1, width)
    x = x * np.array([scale[s] for s in site])[:, None] + np.outer([shift[s] for s in site], rng.uniform(0.5, 1.5,
                                                                                                         width))
    train, new = slice(0, 110), slice(110, n)
    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = neuroCombat(x[train].T.copy(), pd.DataFrame({"site": site[train]}), "site")
    estimates = theirs["estimates"]
    mean, sd = estimates["stand.mean"][:, 0], np.sqrt(estimates["var.pooled"][:, 0])
    which = [list(estimates["batches"]).index(s) for s in site[new]]
    theirs_new = ((x[new] - mean) / sd - estimates["gamma.star"][which]) / np.sqrt(estimates["delta.star"][which]) \
        * sd + mean
    ours = x[train].astype(np.float32)
    harmonisation = Harmonisation.fit("site", list(site[train]), ours)
    assert np.allclose(ours, theirs["data"].T, atol=1e-4)
    assert np.allclose(harmonisation.gamma, theirs["estimates"]["gamma.star"], atol=1e-5)
    assert np.allclose(harmonisation.delta, theirs["estimates"]["delta.star"], atol=1e-5)
    assert np.allclose(harmonisation.apply(list(site[new]), x[new].astype(np.float32)), theirs_new, atol=1e-4)
    for s in "abc":  # what is left of the sites' shifts and scales is small against what was there
        member = site[train] == s
        assert np.abs(ours[member].mean(0) - ours.mean(0)).mean() < 0.25 * np.abs(
            x[train][member].mean(0) - x[train].mean(0)).mean() + 0.05
    again = Harmonisation.from_arrays(harmonisation.arrays())
    first = x[:1].astype(np.float32)
    assert np.allclose(again.apply(["b"], first.copy()), harmonisation.apply(["b"], first.copy()))
    with pytest.raises(ValueError, match="--harmonize site: no training participant comes from d"):
        harmonisation.apply(["d"], x[:1].astype(np.float32))
    with pytest.raises(ValueError, match="a site needs 2 training participants or more .* d \\(1\\)"):
        Harmonisation.fit("site", ["a", "a", "d"], x[:3].astype(np.float32))


def test_combat_in_slices_of_edges_preserves_the_effect_tested_as_neurocombat_does():
    """ComBat before edgewise statistics: the group and a number preserved (neuroCombat's categorical and
    continuous covariates), the same in slices of any size; sites that cannot be told from the group, refused."""
    import warnings

    import pandas as pd
    from neuroCombat import neuroCombat

    from neurox.analysis.harmonize import harmonised_slices

    rng = np.random.default_rng(1)
    n, width = 72, 50
    site = np.array(["a", "b", "c"])[np.arange(n) % 3]
    group = (np.arange(n) // 3) % 2  # both groups at every site
    age = rng.uniform(20, 80, n)
    x = rng.standard_normal((n, width)) + rng.uniform(-1, 1, width)
    x[:, :10] += 1.0 * group[:, None]  # the effect tested, on ten features
    x += 0.02 * (age[:, None] - 50)
    x = x * np.array([{"a": 1.0, "b": 1.8, "c": 0.7}[s] for s in site])[:, None] \
        + np.array([{"a": 0.0, "b": 1.2, "c": -0.6}[s] for s in site])[:, None]
    covars = pd.DataFrame({"site": site, "group": group, "age": age})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = neuroCombat(x.T.copy(), covars, "site", categorical_cols=["group"], continuous_cols=["age"])
    preserved = np.column_stack([group, (age - age.mean()) / age.std()])
    for chunk in (7, 50):
        slices = list(harmonised_slices(lambda lo, hi: x[:, lo:hi], width, chunk, "site", list(site), preserved))
        assert [lo for lo, _ in slices] == list(range(0, width, chunk))
        ours = np.concatenate([part for _, part in slices], axis=1)
        assert np.allclose(ours, theirs["data"].T, atol=1e-5), chunk  # (their iterations stop per site)
    difference = ours[group == 1, :10].mean() - ours[group == 0, :10].mean()
    # the effect kept as the fit across sites sees it: 1.0 at each site's scale, on average over the sites
    assert difference == pytest.approx(np.mean([1.0, 1.8, 0.7]), abs=0.25)
    with pytest.raises(ValueError, match="--harmonize site: the sites cannot be told apart from the effect"):
        list(harmonised_slices(lambda lo, hi: x[:, lo:hi], width, 50, "site", list(site), (site == "b")[:, None]))
    with pytest.raises(ValueError, match="a site needs 2 participants or more to estimate its effect; .* d \\(1\\)"):
        list(harmonised_slices(lambda lo, hi: x[:3, lo:hi], width, 50, "site", ["a", "a", "d"], preserved[:3]))


def test_baseline_and_probe_with_covariates(store, one_epoch_run, tmp_path, capsys):
    run = one_epoch_run
    atlas = three_parcel_atlas(tmp_path)
    fc = tmp_path / "fc"
    assert main(["baseline", "--store", str(store), "--target", "score", "--atlas", str(atlas), "--out", str(fc),
                 "--split_from", str(run), "--covariates", "site", "group", "--n_boot", "20",
                 "--quiet", "true"]) == 0
    stored = np.load(fc / "baseline.npz")
    assert stored["covariates.coef"].shape == (4, 3)  # intercept, site b and c, group x 3 parcels' edges
    # evaluate applies the saved fit: on the same store it gives the baseline's own validation and test outputs
    # (their mean absolute error to the last digit: without the covariates removed alike it would differ)
    evaluated = api.evaluate(run, store, baseline=fc, quiet=True)["fc_baseline"]
    own = json.loads((fc / "metrics.json").read_text())
    for split in ("val", "test"):
        assert evaluated[split]["n_subjects"] == own[split]["n_subjects"] == 2
        assert evaluated[split]["mae"] == pytest.approx(own[split]["mae"], rel=1e-6)
    assert main(["probe", str(run), "--store", str(store), "--target", "group", "--split_from", str(run),
                 "--covariates", "education", "site", "--out", str(tmp_path / "probe"), "--quiet", "true"]) == 0
    assert "neurox probe: 1 of 10 participants have no value of education, site (--covariates)" in \
        capsys.readouterr().err
    # ComBat across sites, fitted on the training participants (two of each site), saved and applied by evaluate
    from neurox.analysis.baseline import evaluate_baseline
    from neurox.data.loader import save_splits

    chosen = tmp_path / "by-site"
    chosen.mkdir()  # sites a: 0 3 6 9, b: 1 4 7, c: 2 5 8
    save_splits(chosen / "splits.tsv", {f"sub-{i:02d}": "train" if i < 6 else "val" if i < 8 else "test"
                                        for i in range(10)})
    harmonised = tmp_path / "fc-harmonised"
    assert main(["baseline", "--store", str(store), "--target", "score", "--atlas", str(atlas), "--out",
                 str(harmonised), "--split_from", str(chosen), "--harmonize", "site", "--n_boot", "0",
                 "--quiet", "true"]) == 0
    stored = np.load(harmonised / "baseline.npz")
    assert stored["harmonize.gamma"].shape == (3, 3)  # sites x edges
    own, evaluated = json.loads((harmonised / "metrics.json").read_text()), evaluate_baseline(harmonised, store, 0)
    for split in ("val", "test"):
        assert evaluated[split]["mae"] == pytest.approx(own[split]["mae"], rel=1e-6)
    unseen = tmp_path / "unseen-site"  # a store with a site the harmonisation never saw: those participants go
    shutil.copytree(store, unseen)
    table = (unseen / "participants.tsv").read_text().replace("sub-09\t1\t33.5\ta", "sub-09\t1\t33.5\tz")
    (unseen / "participants.tsv").write_text(table)
    assert evaluate_baseline(harmonised, unseen, 0)["test"]["n_subjects"] == 1
    assert ("neurox evaluate: 1 of 10 participants come from sites the baseline's harmonisation was not fitted on "
            "(z): left out") in capsys.readouterr().err
    plain = json.loads((fc / "metrics.json").read_text())  # (another split: only that it differs from unharmonised)
    assert own["test"]["mae"] != plain["test"]["mae"]
    assert main(["probe", str(run), "--store", str(store), "--target", "group", "--split_from", str(chosen),
                 "--harmonize", "site", "--covariates", "cohort", "--quiet", "true"]) == 0
    save_splits(chosen / "splits.tsv", {f"sub-{i:02d}": "test" if i in (2, 5, 8) else "train" for i in range(10)})
    assert main(["baseline", "--store", str(store), "--target", "score", "--atlas", str(atlas), "--out",
                 str(tmp_path / "fc-unseen"), "--split_from", str(chosen), "--harmonize", "site"]) == 1
    assert "--harmonize site: no training participant comes from c; ComBat learns" in capsys.readouterr().err
    for column, message in (("hospital", "--covariates hospital: not a column of"),
                            ("mean_fd", "--covariates mean_fd: " + f"{store} has no head motion")):
        assert main(["baseline", "--store", str(store), "--target", "group", "--atlas", str(atlas), "--out",
                     str(tmp_path / "fc2"), "--covariates", column]) == 1
        assert message in capsys.readouterr().err


def test_linear_fit_with_a_class_of_one_participant_fits_without_cross_validation_warnings():
    import warnings

    from neurox.analysis.baseline import fit_linear, linear_outputs

    rng = np.random.default_rng(0)
    y = np.array([0, 0, 0, 1, 1, 1, 2])  # class 2: one participant, nothing to stratify folds on
    x = rng.standard_normal((7, 4)) + y[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fitted = fit_linear(x, y, "multiclass", 0)
    assert linear_outputs(fitted, x).argmax(1)[-1] == 2  # still a fitted model, class 2 included


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
def test_linear_fit_with_more_features_than_rows_is_the_fit_on_all_features(task):
    """fit_linear fits wide embeddings in the rows' own basis: the same model as on the features."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.preprocessing import StandardScaler

    from neurox.analysis.baseline import fit_linear, linear_outputs

    rng = np.random.default_rng(1)
    y = np.arange(40) % (3 if task == "multiclass" else 2)
    x = rng.standard_normal((40, 600)) + 0.3 * y[:, None] * (np.arange(600) < 30)
    if task == "regression":
        y = x[:, :30].sum(1) + rng.standard_normal(40)
    test = rng.standard_normal((10, 600))
    fitted = fit_linear(x, y, task, 0)
    assert fitted["coef"].shape[1] == 600
    z = StandardScaler().fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        full = (RidgeCV(alphas=np.logspace(-2, 5, 15)) if task == "regression"
                else LogisticRegressionCV(Cs=10, cv=5, max_iter=5000, random_state=0)).fit(z.transform(x), y)
    outputs = full.predict if task == "regression" else full.decision_function
    expected = outputs(z.transform(test)).reshape(10, -1)
    assert np.allclose(linear_outputs(fitted, test), expected, atol=1e-3 * np.abs(expected).max())


def test_wide_linear_fit_is_the_same_from_float32_features_in_column_blocks(monkeypatch):
    """The Gram matrix of the wide fit is summed over blocks of standardised columns of float32 features (a
    cohort's connectivity edges are held as float32): blocks of 7 columns, a constant column among them, fit
    the same model, and score rows block by block, as one block of float64 does."""
    import neurox.analysis.baseline as baseline

    rng = np.random.default_rng(2)
    y = np.arange(30) % 2
    x = rng.standard_normal((30, 200)) + 0.5 * y[:, None] * (np.arange(200) < 20)
    x[:, 5] = 1.5  # a constant edge: scaled by 1, weighted 0
    whole = baseline.fit_linear(x, y, "binary", 0)
    monkeypatch.setattr(baseline, "BLOCK_VALUES", 30 * 7)
    blocked = baseline.fit_linear(x.astype(np.float32), y, "binary", 0)
    assert blocked["coef"].dtype == np.float64 and blocked["coef"][0, 5] == 0 and blocked["scale"][5] == 1
    test = rng.standard_normal((9, 200)).astype(np.float32)
    assert np.allclose(baseline.linear_outputs(blocked, test), baseline.linear_outputs(whole, test), atol=1e-5)
    assert baseline.linear_outputs(blocked, test[:0]).shape == (0, 1)
    alike = baseline.fit_linear(np.ones((30, 200)), y, "binary", 0)  # rows without a difference: the intercept
    assert not alike["coef"].any() and np.ptp(baseline.linear_outputs(alike, test)) == 0
    design = baseline.linear_design(x.astype(np.float32))  # computed once for several targets: the same fits
    score = x[:, :20].sum(1)
    for target, task in ((y, "binary"), (score, "regression")):
        shared = baseline.fit_linear(x.astype(np.float32), target, task, 0, design)
        alone = baseline.fit_linear(x.astype(np.float32), target, task, 0)
        assert all(np.array_equal(shared[k], alone[k]) for k in alone)
