"""Fine-tuning, evaluation and the engine: splits, metrics, distributed parity, resume, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import (
    N_SUBJECTS,
    OPTIONS,
    bids_run,
    bold,
    cohort_store,
    finetune_args,
    free_port,
    run_until_step_then_signal,
    subprocess_env,
    three_parcel_atlas,
)
from safetensors.torch import load_file

from neurox import api
from neurox.cli import main
from neurox.data.loader import Cohort, describe_target, infer_target, load_cohort, load_splits, split_participants
from neurox.data.prepare import prepare
from neurox.data.store import Store, read_tsv
from neurox.train.engine import StepSampler, consolidated_state
from neurox.train.metrics import auroc, with_intervals

ENV = subprocess_env()  # for neurox subprocesses


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return cohort_store(tmp_path_factory)


@pytest.fixture(scope="module")
def one_process_run(store, tmp_path_factory) -> Path:
    """The default run in a process of its own (one thread, on the CPU): what the runs on two processes and the
    interrupted run must reproduce. Only read."""
    run = tmp_path_factory.mktemp("one-process") / "run"
    subprocess.run([sys.executable, "-m", "neurox.cli", *finetune_args(store, run, "--device", "cpu")], check=True,
                   env=ENV, capture_output=True)
    return run


# --- splits, metrics, sampler ------------------------------------------------------------------------


def test_no_participant_in_two_splits_and_classes_stratified(store):
    cohort = load_cohort(Store(store), ["group"])
    assert cohort.left_out == 0 and len(cohort.participants) == N_SUBJECTS  # sub-99 has no runs
    split = split_participants(cohort, seed=0)
    assert set(split) == set(cohort.participants)  # every participant exactly once
    for name in ("train", "val", "test"):
        members = [p for p, s in split.items() if s == name]
        assert {cohort.values[p][0] for p in members} == {"0", "1"}, name  # both classes on each side
    assert split == split_participants(cohort, seed=0) != split_participants(cohort, seed=1)


def family_cohort(n: int = 300, seed: int = 0) -> Cohort:
    """``n`` participants in families of 1 to 4, a binary target, a family column with a few values missing."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n)
    family = np.repeat(np.arange(n), sizes)[:n]
    ids = [f"sub-{i:03d}" for i in range(n)]
    values = {p: [str(rng.integers(0, 2))] for p in ids}
    group = {p: f"F{family[i]}" for i, p in enumerate(ids) if i % 50}  # every 50th has no family ID
    return Cohort([infer_target("dx", [v[0] for v in values.values()])], ids, values, {p: [p] for p in ids}, {},
                  split_by="family", group=group)


def test_each_target_is_said_as_it_was_read(capsys):
    """A column of codes read as numbers (UK Biobank's -3 for "prefer not to answer") shows before any training."""
    codes = ["0", "1", "-3", "2", "0", "1"]
    smoking = infer_target("smoking", codes)
    assert smoking.task == "regression"
    assert describe_target(smoking, codes) == (
        "a number, -3 to 2 (mean 0.1667, 6 values); only 4 distinct values (-3, 0, 1, 2): if they are classes, "
        "--task multiclass; if some are codes for no answer, make them n/a in the phenotype table")
    ages = [f"{a:.1f}" for a in np.linspace(8, 21, 40)]
    assert describe_target(infer_target("age", ages), ages) == "a number, 8 to 21 (mean 14.5, 40 values)"
    assert describe_target(infer_target("smoking", codes, "multiclass"), codes) == \
        "4 classes, -3 (1), 0 (2), 1 (2), 2 (1)"
    # codes among more distinct values than a few: UK Biobank's fluid intelligence (0-13), ABCD's 777 and 999
    fluid = [str(v) for v in range(14)] * 3 + ["-1", "-1", "-3"]
    assert describe_target(infer_target("fi", fluid), fluid).endswith(
        "; -3 (1), -1 (2) look like codes for no answer (UK Biobank's negatives, ABCD's 777 and 999): if so, make "
        "them n/a in the phenotype table")
    score = [str(v) for v in range(31)] + ["777", "999", "999"]
    assert "; 777 (1), 999 (2) look like codes" in describe_target(infer_target("cbcl", score), score)
    for measured in (ages, [f"{v:.2f}" for v in np.random.default_rng(0).standard_normal(40)],  # a z-score
                     [str(v) for v in range(-15, 16)], [str(v) for v in range(60, 100)]):  # a change; 99 years
        assert "codes" not in describe_target(infer_target("x", measured), measured)
    cohort = family_cohort(n=20)
    cohort.say_targets("finetune")
    counts = [sum(v == [c] for v in cohort.values.values()) for c in ("0", "1")]
    assert capsys.readouterr().err == (f"neurox finetune: dx: two classes, 0 ({counts[0]}) and 1 ({counts[1]}); 1 "
                                       "is the positive class (the output and AUROC are of it)\n")


def test_split_by_keeps_families_on_one_side(capsys):
    cohort = family_cohort()
    split = split_participants(cohort, seed=0)
    assert set(split) == set(cohort.participants)
    sides: dict[str, set[str]] = {}
    for p, family in cohort.group.items():
        sides.setdefault(family, set()).add(split[p])
    assert all(len(s) == 1 for s in sides.values())  # no family on two sides
    counts = {name: sum(s == name for s in split.values()) for name in ("train", "val", "test")}
    assert 50 <= counts["val"] <= 70 and 50 <= counts["test"] <= 70  # 20% each, give or take a family
    for name in ("train", "val", "test"):
        assert {cohort.values[p][0] for p, s in split.items() if s == name} == {"0", "1"}
    err = capsys.readouterr().err
    assert "neurox: 6 of 300 participants have no family value: each is split on its own" in err
    assert f"split by family: {counts['train']} training participants (" in err
    # without split_by, or with a column that sets everyone apart, the split is the one it always was
    apart = Cohort(cohort.targets, cohort.participants, cohort.values, cohort.runs, {}, split_by="id",
                   group={p: p for p in cohort.participants})
    plain = Cohort(cohort.targets, cohort.participants, cohort.values, cohort.runs, {})
    assert split_participants(apart, seed=3) == split_participants(plain, seed=3) != split
    # blocks too few or too large to fill every side: one line, not an empty test set
    two_sites = Cohort(cohort.targets, cohort.participants, cohort.values, cohort.runs, {}, split_by="site",
                       group={p: "AB"[i % 2] for i, p in enumerate(cohort.participants)})
    with pytest.raises(ValueError, match="--split_by site: its 2 values cannot fill the test split"):
        split_participants(two_sites, seed=0)


def test_split_by_large_groups_come_near_the_fractions():
    """Sites of 30, 25, 20, 15 and 10 participants, split 60/20/20: each site whole, no side over its share by more
    than the smallest site, whatever the seed (placed in a seeded order, a site of 30 used to fill validation)."""
    sizes = [30, 25, 20, 15, 10]
    ids = [f"sub-{i:03d}" for i in range(100)]
    site = {p: f"S{next(k for k, end in enumerate(np.cumsum(sizes)) if i < end)}" for i, p in enumerate(ids)}
    values = {p: [str(i * 0.5)] for i, p in enumerate(ids)}
    cohort = Cohort([infer_target("age", [v[0] for v in values.values()])], ids, values, {p: [p] for p in ids}, {},
                    split_by="site", group=site)
    for seed in range(5):
        split = split_participants(cohort, seed=seed, say=False)
        assert all(len({split[p] for p in ids if site[p] == s}) == 1 for s in set(site.values()))
        counts = {name: sum(v == name for v in split.values()) for name in ("train", "val", "test")}
        assert abs(counts["val"] - 20) <= 10 and abs(counts["test"] - 20) <= 10 and counts["train"] >= 50


def test_split_by_with_sessions_keeps_a_family_and_all_its_visits_together():
    """Visits are units; a family ID given at one visit (ABCD's baseline row) holds for every visit."""
    people = [f"sub-{i:03d}" for i in range(120)]
    units = [f"{p}_ses-{v}" for p in people for v in (1, 2)]
    person = {u: u.split("_ses-")[0] for u in units}
    group = {u: f"F{int(person[u][4:]) // 3}" for u in units if u.endswith("_ses-1")}  # families of 3, visit 1 only
    values = {u: [str(int(person[u][4:]) % 2)] for u in units}
    cohort = Cohort([infer_target("dx", ["0", "1"])], units, values, {u: [u] for u in units}, {}, person=person,
                    split_by="family", group=group)
    split = split_participants(cohort, seed=0, say=False)
    for family in range(40):
        members = [u for u in units if int(person[u][4:]) // 3 == family]
        assert len(members) == 6 and len({split[u] for u in members}) == 1


def test_folds_keep_families_together_and_balance_classes(capsys):
    from neurox.data.loader import fold_participants

    cohort = family_cohort()
    folds = fold_participants(cohort, seed=0, folds=5)
    assert set(folds) == set(cohort.participants) and set(folds.values()) == {1, 2, 3, 4, 5}
    in_fold: dict[str, set[int]] = {}
    for p, family in cohort.group.items():
        in_fold.setdefault(family, set()).add(folds[p])
    assert all(len(f) == 1 for f in in_fold.values())  # no family in two folds
    sizes = [sum(f == k for f in folds.values()) for k in range(1, 6)]
    ones = [sum(f == k and cohort.values[p][0] == "1" for p, f in folds.items()) for k in range(1, 6)]
    assert max(sizes) - min(sizes) <= 4  # families of up to 4, dealt evenly
    assert all(0.3 < n / size < 0.7 for n, size in zip(ones, sizes))  # a family's class is its first member's
    plain = Cohort(cohort.targets, cohort.participants, cohort.values, cohort.runs, {})  # each person alone
    alone = fold_participants(plain, seed=0, folds=7)
    for label in ("0", "1"):  # each class dealt evenly: 7 folds differ by one participant at most
        counts = [sum(f == k and cohort.values[p][0] == label for p, f in alone.items()) for k in range(1, 8)]
        assert max(counts) - min(counts) <= 1
    assert "folds by family: " in capsys.readouterr().err
    assert folds == fold_participants(cohort, seed=0, folds=5, say=False) != fold_participants(cohort, 1, 5, False)
    two_sites = Cohort(cohort.targets, cohort.participants, cohort.values, cohort.runs, {}, split_by="site",
                       group={p: "AB"[i % 2] for i, p in enumerate(cohort.participants)})
    with pytest.raises(ValueError, match="--folds 3: only 2 site groups to deal into them"):
        fold_participants(two_sites, seed=0, folds=3)
    with pytest.raises(ValueError, match="--folds 1: cross-validation needs 2 folds or more"):
        fold_participants(cohort, seed=0, folds=1)


def test_finetune_baseline_and_probe_split_by_a_column(store, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(finetune_args(store, run, "--epochs", "1", "--split_by", "family")) == 0
    split = load_splits(run / "splits.tsv")
    assert all(split[f"sub-{2 * k:02d}"] == split[f"sub-{2 * k + 1:02d}"] for k in range(5))  # siblings together
    assert ("split by family: 6 training participants (3 groups), 2 validation participants (1 group), 2 test"
            in capsys.readouterr().err)
    atlas = tmp_path / "atlas.nii.gz"
    labels = np.zeros(bold(1).shape[:3], dtype=np.int16)
    labels[5:20, 10:25, 10:20], labels[20:35, 10:25, 10:20] = 1, 2
    from fakes import save

    save(atlas, labels)
    fc = tmp_path / "fc"
    assert main(["baseline", "--store", str(store), "--target", "group", "--atlas", str(atlas), "--out", str(fc),
                 "--split_by", "family", "--n_boot", "20", "--quiet", "true"]) == 0
    assert load_splits(fc / "splits.tsv") == split  # the same seed and column: the same split
    assert main(["probe", str(run), "--store", str(store), "--target", "group", "--split_by", "family",
                 "--out", str(tmp_path / "probe"), "--quiet", "true"]) == 0
    assert load_splits(tmp_path / "probe" / "splits.tsv") == split
    assert main(finetune_args(store, tmp_path / "by-site", "--split_by", "site")) == 1
    assert "--split_by site: its 3 values cannot fill the test split" in capsys.readouterr().err
    assert main(finetune_args(store, tmp_path / "by-x", "--split_by", "hospital")) == 1
    assert "no --split_by column 'hospital' in participants.tsv" in capsys.readouterr().err


def test_finetune_cross_validated_pools_every_folds_test_and_resumes(store, tmp_path, capsys):
    """--folds 3: a run per fold testing on it and choosing on the next; every participant tested once; the
    pooled metrics are those of the pooled test outputs; --resume keeps finished folds and runs the rest."""
    from sklearn.metrics import roc_auc_score

    out = tmp_path / "cv"
    assert main(finetune_args(store, out, "--epochs", "1", "--folds", "3")) == 0
    printed = capsys.readouterr().out
    assert "  cv: accuracy " in printed and "  cv_fold3: accuracy " in printed
    fold = {r["participant_id"]: int(r["fold"]) for r in read_tsv(out / "folds.tsv")}
    assert sorted(fold.values()) == [1] * 4 + [2] * 3 + [3] * 3
    for k in (1, 2, 3):
        split = load_splits(out / f"fold{k}" / "splits.tsv")
        assert {p for p, s in split.items() if s == "test"} == {p for p, f in fold.items() if f == k}
        assert {p for p, s in split.items() if s == "val"} == {p for p, f in fold.items() if f == k % 3 + 1}
        assert (out / f"fold{k}" / "model" / "config.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"cv", "cv_mean", "cv_fold1", "cv_fold2", "cv_fold3"}
    assert metrics["cv"]["n_subjects"] == 10 and "auroc_p" in metrics["cv"] and "auroc_ci_low" in metrics["cv"]
    rows = read_tsv(out / "predictions.tsv")
    assert sorted(r["participant_id"] for r in rows) == sorted(fold) and {r["split"] for r in rows} == {"cv"}
    assert all(int(r["fold"]) == fold[r["participant_id"]] for r in rows)
    scale = {}  # each fold's recentred logits, pooled on the scale of its outputs on its validation participants
    for k in (1, 2, 3):
        chosen = [float(r["group_output"]) for r in read_tsv(out / f"fold{k}" / "predictions.tsv")
                  if r["split"] == "val"]
        scale[str(k)] = np.std(chosen)
    pooled = [float(r["group_output"]) / scale[r["fold"]] for r in rows]
    expected = roc_auc_score([int(r["group_true"]) for r in rows], pooled)
    assert metrics["cv"]["auroc"] == pytest.approx(expected, abs=1e-6)
    assert main(finetune_args(store, out, "--epochs", "1", "--folds", "3")) == 1
    assert "already holds a run; pass --resume true" in capsys.readouterr().err
    shutil.rmtree(out / "fold3")  # as if stopped before fold 3 began
    kept = (out / "fold1" / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(finetune_args(store, out, "--epochs", "1", "--folds", "3", "--resume", "true")) == 0
    assert "fold 3 of 3" in capsys.readouterr().out
    assert (out / "fold1" / "model" / "model.safetensors").stat().st_mtime_ns == kept  # finished: not run again
    assert json.loads((out / "metrics.json").read_text())["cv"]["n_subjects"] == 10
    assert main(["predict", str(out), "--store", str(store), "--out", str(tmp_path / "p.tsv")]) == 1
    assert "every participant was in the cross-validation" in capsys.readouterr().err  # the folds' models saw them
    assert main(["embed", str(out), "--store", str(store), "--out", str(tmp_path / "x.tsv")]) == 1
    assert "a cross-validated run has a model per fold: " in capsys.readouterr().err
    assert main(finetune_args(store, tmp_path / "cv2", "--folds", "2")) == 1
    assert "--folds 2: fine-tuning needs 3 folds or more" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["binary", "regression", "multiclass"])
def test_cross_validated_run_predicts_new_participants_with_its_folds_together(store, tmp_path, kind, capsys):
    """predict and evaluate of a --folds run: the participants none of its folds saw, each scored by every fold's
    model, averaged in the target's units (logits, numbers, probabilities); each fold alone is an ordinary run."""
    from neurox.train.folds import ensemble_targets, fold_models

    target, where = {"binary": ("group", "cohort=control"), "regression": ("education", None),
                     "multiclass": ("site", "cohort=control")}[kind]
    out = tmp_path / "cv"  # regression: sub-03's education is n/a, so it is new to the folds as the patients are
    assert main([*finetune_args(store, out, "--epochs", "1", "--folds", "3"), "--target", target,
                 *(["--where", where] if where else [])]) == 0
    new = ["sub-04", "sub-05"] if where else ["sub-03"]
    read_as = {"binary": "two classes, 0 (", "regression": "a number, ", "multiclass": "3 classes, a ("}[kind]
    assert f"neurox finetune: {target}: {read_as}" in capsys.readouterr().err  # said once per fold
    assert main(["predict", str(out), "--store", str(store), "--out", str(tmp_path / "ensemble.tsv")]) == 0
    said = capsys.readouterr().err
    assert f"{N_SUBJECTS - len(new)} participants of the cross-validation left out" in said
    assert "model 3 of 3" in said and not list(tmp_path.glob(".*.parts"))  # what it kept to resume is gone
    rows = {r["participant_id"]: r for r in read_tsv(tmp_path / "ensemble.tsv")}
    assert sorted(rows) == new and {r["split"] for r in rows.values()} == {"external"}
    alone = []  # each fold's model as a run of its own
    for k in (1, 2, 3):
        fold_run = out / f"fold{k}"
        assert main(["predict", str(fold_run), "--store", str(store), "--out", str(tmp_path / f"{k}.tsv")]) == 0
        alone.append({r["participant_id"]: r for r in read_tsv(tmp_path / f"{k}.tsv")})
    for p in new:
        if kind == "multiclass":
            for c in "abc":
                column = f"site_probability_{c}"
                assert float(rows[p][column]) == pytest.approx(np.mean([float(a[p][column]) for a in alone]),
                                                               abs=2e-6)
            expected = max("abc", key=lambda c: float(rows[p][f"site_probability_{c}"]))
            assert rows[p]["site_predicted"] == expected
        else:
            column = f"{target}_output"  # a logit, or a number in its units: each fold standardised its own way
            assert float(rows[p][column]) == pytest.approx(np.mean([float(a[p][column]) for a in alone]), abs=2e-6)
    if kind == "regression":
        folds = [json.loads((out / f"fold{k}" / "targets.json").read_text())["targets"][0]["gap_fit"]
                 for k in (1, 2, 3)]
        assert all(folds) and ensemble_targets(fold_models(out))[0].gap_fit == pytest.approx(np.mean(folds, axis=0))
        assert rows["sub-03"]["education_true"] == "" and main(["evaluate", str(out), "--store", str(store)]) == 1
        assert "every participant with a value of education was in the cross-validation" in capsys.readouterr().err
    if kind == "binary":
        assert main(["evaluate", str(out), "--store", str(store), "--out", str(tmp_path / "m.json"),
                     "--compare", str(out / "fold1")]) == 0
        results = json.loads((tmp_path / "m.json").read_text())
        assert set(results["model"]) == {"external"} and results["model"]["external"]["n_subjects"] == 2
        logits = {p: float(rows[p]["group_output"]) for p in new}
        assert results["model"]["external"]["auroc"] == auroc(np.array([0, 1]), np.array([logits[p] for p in new]))
        assert results["compared"]["external"]["n_subjects"] == 2  # one fold's model alone, on the same two
        assert not list(tmp_path.glob(".*.parts"))
        # an interrupted predict resumes: each model's outputs, kept per fold until the table is written, are read back
        from neurox.hub import weights_digest
        from neurox.io.claim import kept_parts, resolved

        table = tmp_path / "resumed.tsv"
        kept = kept_parts(table, {"models": [weights_digest(out / f"fold{k}" / "model") for k in (1, 2, 3)],
                                  "store": resolved(Store(store).root)})
        (kept / "fold1").mkdir()
        np.save(kept / "fold1" / "sub-04.npy", np.full((2, 1), 10.0, np.float32))  # as if model 1 had scored sub-04
        assert main(["predict", str(out), "--store", str(store), "--out", str(table)]) == 0
        resumed = {r["participant_id"]: float(r["group_output"]) for r in read_tsv(table)}
        others = [float(a["sub-04"]["group_output"]) for a in alone[1:]]
        assert resumed["sub-04"] == pytest.approx((10.0 + sum(others)) / 3, abs=2e-6) and not kept.exists()
        assert resumed["sub-05"] == pytest.approx(float(rows["sub-05"]["group_output"]), abs=1e-6)
        # under a launcher the processes share each model's windows, and the first writes what one process did
        two = tmp_path / "two.tsv"
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               str(free_port()), "-m", "neurox.cli", "predict", str(out), "--store", str(store),
                               "--out", str(two), "--batch_size", "1"], env=ENV, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stderr.count("participants of the cross-validation left out") == 1
        assert not (tmp_path / ".two.tsv.parts").exists()
        shared = {r["participant_id"]: float(r["group_output"]) for r in read_tsv(two)}
        assert sorted(shared) == new and all(shared[p] == pytest.approx(float(rows[p]["group_output"]), abs=1e-5)
                                             for p in new)
        # explain: each participant of the cross-validation by the model of the fold that tested them, its
        # attributions on the pooled scale (over that fold's validation outputs' standard deviation)
        import nibabel as nib

        from neurox.train.folds import output_scale, tested_by

        fold_of = tested_by(out)
        pair = [min(p for p in fold_of if fold_of[p] == k) for k in (1, 2)]
        args = ["--store", str(store), "--n_steps", "2", "--quiet", "true"]
        assert main(["explain", str(out), "--out", str(tmp_path / "x"), "--subject", *pair, "sub-04", *args]) == 0
        assert "1 participants outside the cross-validation" in capsys.readouterr().err
        assert json.loads((tmp_path / "x" / "explain.json").read_text())["tested_by_fold"] == {pair[0]: 1, pair[1]: 2}
        for p, k in zip(pair, (1, 2)):
            fold_run = out / f"fold{k}"
            assert main(["explain", str(fold_run), "--out", str(tmp_path / f"x{k}"), "--subject", p, *args]) == 0
            alone, pooled = (np.asarray(nib.load(str(d / f"{p}_space-store_attribution.nii.gz")).dataobj)
                             for d in (tmp_path / f"x{k}", tmp_path / "x"))
            assert np.allclose(pooled, alone * output_scale(out / f"fold{k}")[0], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("kind", ["binary", "regression", "multiclass"])
def test_pooled_folds_compare_outputs_on_one_scale(store, tmp_path, kind):
    """Pooled, each fold's outputs are put on one scale: a class's logits by the fold's validation outputs (a fold
    whose logits all sit 5 higher ranks the pool as well as without), a number in its units (each fold
    standardised it by its own training participants), several classes as probabilities; cv_mean is the folds'
    mean and spread."""
    from neurox.data.loader import Target
    from neurox.train.engine import write_json
    from neurox.train.folds import pool_folds
    from neurox.train.metrics import auroc
    from neurox.train.runs import prediction_rows, write_predictions

    rng = np.random.default_rng(0)
    people = [f"sub-{i:02d}" for i in range(40)]
    values = {"binary": lambda i: str(i % 2), "regression": lambda i: f"{rng.uniform(20, 60):.2f}",
              "multiclass": lambda i: "abc"[i % 3]}
    truth = {p: [values[kind](i)] for i, p in enumerate(people)}
    score = {p: rng.normal(0, 1) for p in people}
    for fold, tested, chosen in ((1, people[:20], people[20:30]), (2, people[20:], people[:10])):
        if kind == "binary":
            target = Target("dx", "binary", classes=["0", "1"])
            outputs = {p: [1.5 * int(truth[p][0]) + score[p] + 5.0 * (fold == 2)] for p in people}
        elif kind == "regression":
            target = Target("age", "regression", mean=30.0 + fold, std=5.0 * fold)  # its own standardisation
            outputs = {p: [(float(truth[p][0]) + 3 * score[p] - target.mean) / target.std] for p in people}
        else:
            target = Target("dx", "multiclass", classes=["a", "b", "c"])
            outputs = {p: list(rng.normal(0, 1, 3) + 2 * np.eye(3)[ord(truth[p][0]) - 97]) for p in people}
        run_dir = tmp_path / f"fold{fold}"
        run_dir.mkdir()
        write_json(run_dir / "targets.json", {"targets": [target.to_dict()]})
        write_json(run_dir / "metrics.json", {"test": {"auroc": 0.5 + 0.1 * fold, "n_subjects": 20}})
        rows = [row for split, members in (("val", chosen), ("test", tested)) for row in
                prediction_rows([target], truth, split, members, np.array([outputs[p] for p in members]))]
        write_predictions(run_dir / "predictions.tsv", [target], rows)
    results = pool_folds(tmp_path, 2, 0, Store(store))
    pooled = results["cv"]
    rows = read_tsv(tmp_path / "predictions.tsv")
    assert len(rows) == 40 and pooled["n_subjects"] == 40 and {r["fold"] for r in rows} == {"1", "2"}
    assert results["cv_mean"]["auroc"] == pytest.approx(0.65) and results["cv_mean"]["auroc_sd"] == pytest.approx(0.05)
    if kind == "binary":
        unshifted = [1.5 * int(truth[p][0]) + score[p] for p in people]
        assert pooled["auroc"] == pytest.approx(auroc(np.array([int(truth[p][0]) for p in people]),
                                                      np.array(unshifted)), abs=0.03)
        raw = [float(r["dx_output"]) for r in rows]  # as the fold's model gave them: fold 2's 5 higher
        assert auroc(np.array([int(r["dx_true"]) for r in rows]), np.array(raw)) < pooled["auroc"] - 0.1
    elif kind == "regression":
        errors = [abs(float(r["age_predicted"]) - float(r["age_true"])) for r in rows]
        assert pooled["mae"] == pytest.approx(np.mean(errors), abs=1e-4)
    else:
        assert pooled["accuracy"] == pytest.approx(np.mean([r["dx_predicted"] == r["dx_true"] for r in rows]))


def test_a_model_of_the_controls_predicts_the_patients_as_external(store, tmp_path, capsys):
    """--where keeps only the participants with a phenotype value (a normative model of controls); the others
    are the run's external participants for evaluate and predict."""
    run = tmp_path / "run"
    assert main(finetune_args(store, run, "--epochs", "1", "--where", "cohort=control")) == 0
    split = load_splits(run / "splits.tsv")
    assert len(split) == 8 and not {"sub-04", "sub-05"} & set(split)
    api.predict(run, store, tmp_path / "p.tsv", quiet=True)
    rows = {r["participant_id"]: r for r in read_tsv(tmp_path / "p.tsv")}
    assert rows["sub-04"]["split"] == rows["sub-05"]["split"] == "external" and len(rows) == 10
    assert api.evaluate(run, store, quiet=True)["model"]["external"]["n_subjects"] == 2
    atlas = tmp_path / "atlas.nii.gz"
    labels = np.zeros(bold(1).shape[:3], dtype=np.int16)
    labels[5:20, 10:25, 10:20], labels[20:35, 10:25, 10:20] = 1, 2
    from fakes import save

    save(atlas, labels)
    assert main(["baseline", "--store", str(store), "--target", "group", "--atlas", str(atlas), "--out",
                 str(tmp_path / "fc"), "--where", "cohort=control", "--quiet", "true"]) == 0
    assert load_splits(tmp_path / "fc" / "splits.tsv") == split  # the same participants, seed and split
    assert main(["probe", str(run), "--store", str(store), "--target", "group", "--where", "cohort=control",
                 "--quiet", "true"]) == 0
    for where, message in (("cohort=athlete", "--where cohort=athlete: no participant of"),
                           ("diagnosis=control", "--where 'diagnosis=control': expected COLUMN=VALUE")):
        assert main(finetune_args(store, tmp_path / "x", "--where", where)) == 1
        assert message in capsys.readouterr().err


def test_participants_without_a_target_value_are_left_out_and_said_so(store, tmp_path, capsys):
    cohort = load_cohort(Store(store), ["education"])
    assert cohort.left_out == 1 and "sub-03" not in cohort.participants
    args = finetune_args(store, tmp_path / "run", "--epochs", "1")
    args[args.index("group")] = "education"
    assert main(args) == 0
    assert ("neurox finetune: 1 of 10 participants with prepared runs have no usable value of education") in \
        capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "run"), "--store", str(store)]) == 0  # evaluate says it too
    assert "neurox evaluate: 1 of 10 participants" in capsys.readouterr().err
    unlabelled = tmp_path / "unlabelled"
    bids_run(unlabelled, "00", n_frames=40)  # no participants.tsv: outputs can be predicted, not scored
    assert prepare(unlabelled, tmp_path / "unlabelled-store", OPTIONS, progress=False).ok
    assert main(["evaluate", str(tmp_path / "run"), "--store", str(tmp_path / "unlabelled-store")]) == 1
    assert "so there is nothing to score; neurox predict writes" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "targets.json").read_text())["participants_left_out"] == 1


def test_the_balanced_threshold_lies_halfway_between_the_classes_medians():
    from neurox.train.metrics import balanced_threshold

    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 100.0])  # every output above 0; one far out
    assert balanced_threshold(labels, scores) == (3.0 + 6.5) / 2
    assert balanced_threshold(labels[:3], scores[:3]) == 0.0  # one class: nothing to recentre on


def test_several_classes_are_recentred_so_that_no_class_is_favoured():
    """Logits of a model that learned three classes in shares 0.6, 0.3, 0.1 favour the common ones by the log of
    their shares; the offsets take that out (balanced accuracy up, AUROC unchanged), and the saved head carries
    them, recorded per class."""
    from types import SimpleNamespace

    from neurox.data.loader import Target
    from neurox.models.heads import build_head
    from neurox.train.finetune import recentre_head
    from neurox.train.metrics import balanced_offsets, classification_metrics
    from neurox.train.objectives import decision_thresholds

    rng = np.random.default_rng(0)
    shares = np.array([0.6, 0.3, 0.1])
    labels = rng.choice(3, 3000, p=shares)
    centres = np.array([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])
    x = centres[labels] + rng.standard_normal((3000, 2))
    logits = -0.5 * ((x[:, None, :] - centres[None]) ** 2).sum(-1) + np.log(shares)  # the true posterior's
    offsets = balanced_offsets(labels, logits)
    assert offsets == pytest.approx(np.log(shares) - np.log(shares).mean(), abs=0.1)
    before, after = classification_metrics(labels, logits), classification_metrics(labels, logits - offsets)
    assert after["balanced_accuracy"] > before["balanced_accuracy"] + 0.04 and after["auroc"] == before["auroc"]
    assert not balanced_offsets(labels[labels < 2], logits[labels < 2]).any()  # a class with no participant
    target = Target("site", "multiclass", ["a", "b", "c"])
    people = [f"sub-{i}" for i in range(len(labels))]
    moved = decision_thresholds([target], people, logits, {p: [k] for p, k in zip(people, labels)})
    assert moved == pytest.approx(offsets)
    model = SimpleNamespace(head=build_head("multiclass", 8, 3))
    bias = model.head.head.bias.detach().clone()
    notes = recentre_head(model, [target], moved)
    assert np.allclose(model.head.head.bias.detach().numpy(), bias.numpy() - moved, atol=1e-6)
    assert target.threshold == pytest.approx(list(moved)) and target.to_dict()["threshold"] == target.threshold
    assert "decision for site" in notes and "lowered by a " in notes["decision for site"]


def test_auroc_and_intervals():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = labels + rng.normal(0, 1, 200)
    from sklearn.metrics import roc_auc_score

    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.5, 0.5, 0.9])) == pytest.approx(0.875)  # ties
    result = with_intervals("binary", labels, scores[:, None], n_boot=200)
    assert result["auroc_ci_low"] < result["auroc"] < result["auroc_ci_high"]
    assert result["n_subjects"] == 200 and result["auroc_p"] == pytest.approx(1 / 201)  # none of 200 as good


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
def test_permutation_p_is_the_share_of_label_permutations_scoring_as_well(task):
    """The rank-sum shortcut gives the p-value of recomputing the metric on every permutation."""
    from neurox.train.metrics import classification_metrics, pearson, permutation_p

    rng = np.random.default_rng(1)
    n, n_perm = 30, 300
    labels = rng.integers(0, 3 if task == "multiclass" else 2, n).astype(float) if task != "regression" else \
        rng.normal(0, 1, n)
    outputs = rng.normal(0, 1, (n, 3 if task == "multiclass" else 1))
    outputs[:, 0] += 0.4 * (labels if task != "multiclass" else labels == 0)  # a weak signal: p neither 0 nor 1
    outputs = np.round(outputs, 1)  # ties, which mid-ranks share

    def metric(y):
        return pearson(y, outputs[:, 0]) if task == "regression" else classification_metrics(y, outputs)["auroc"]

    draw = np.random.default_rng([0, 1])  # the permutations permutation_p draws, in its order
    observed = metric(labels)
    above = sum(metric(draw.permutation(labels)) >= observed - 1e-12 for _ in range(n_perm))
    key = "pearson_r_p" if task == "regression" else "auroc_p"
    assert permutation_p(task, labels, outputs, n_perm)[key] == pytest.approx((1 + above) / (1 + n_perm))
    assert 0.01 < (1 + above) / (1 + n_perm) < 0.9


def test_permutation_p_without_signal_is_below_005_about_one_time_in_twenty():
    from neurox.train.metrics import permutation_p

    rng = np.random.default_rng(2)
    p = [permutation_p("binary", rng.integers(0, 2, 40).astype(float), rng.normal(0, 1, (40, 1)), 200, seed)
         ["auroc_p"] for seed in range(300)]
    assert 0.02 < np.mean(np.array(p) < 0.05) < 0.09


def test_step_sampler_gives_each_process_its_part_of_the_global_batch():
    one = list(StepSampler(24, batch=4, world=1, rank=0, accumulation=1, start_step=0))
    two = [list(StepSampler(24, batch=2, world=2, rank=r, accumulation=1, start_step=0)) for r in range(2)]
    for step in range(6):  # the same items per step, split between the processes
        together = two[0][step * 2 : step * 2 + 2] + two[1][step * 2 : step * 2 + 2]
        assert sorted(one[step * 4 : step * 4 + 4]) == sorted(together)
    resumed = list(StepSampler(24, batch=4, world=1, rank=0, accumulation=1, start_step=2))
    assert resumed == one[8:]


# --- the commands ----------------------------------------------------------------------------------------


def test_finetune_evaluate_predict(store, one_epoch_run, tmp_path, capsys):
    run = one_epoch_run
    for name in ("config.yaml", "splits.tsv", "targets.json", "metrics.jsonl", "metrics.json", "predictions.tsv",
                 "model/config.json", "checkpoints/last/trainer.pt"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"val", "test"}
    assert {"auroc", "accuracy", "balanced_accuracy", "auroc_ci_low", "n_subjects"} <= set(metrics["test"])
    card = (run / "model" / "README.md").read_text()  # the best validation's scores, one per line
    assert "- validation at step: " in card and "\n- auroc: " in card and "\n- n subjects: " in card
    predictions = read_tsv(run / "predictions.tsv")
    splits = {row["participant_id"]: row["split"] for row in read_tsv(run / "splits.tsv")}
    assert len(predictions) == metrics["val"]["n_subjects"] + metrics["test"]["n_subjects"]
    assert all(splits[row["participant_id"]] == row["split"] for row in predictions)
    # the class decision, recentred on the validation participants: the saved head's bias is the trained one's less
    # the threshold targets.json records, which puts 0 halfway between the classes' median validation outputs
    threshold = json.loads((run / "targets.json").read_text())["targets"][0]["threshold"]
    trained = consolidated_state(run / "checkpoints" / "last")["model"]["head.head.bias"]
    saved = load_file(str(run / "model" / "head.safetensors"))["head.bias"]
    assert threshold != 0 and saved.item() == pytest.approx(trained.item() - threshold, abs=1e-6)
    assert "- decision for group: at output 0, where the trained head's logit" in card
    val = [r for r in predictions if r["split"] == "val"]
    medians = [np.median([float(r["group_output"]) for r in val if r["group_true"] == c]) for c in ("0", "1")]
    assert np.mean(medians) == pytest.approx(0, abs=1e-5)
    assert all(r["group_predicted"] == str(int(float(r["group_output"]) > 0)) for r in predictions)
    test = [r for r in predictions if r["split"] == "test"]
    recalls = [np.mean([float(r["group_output"]) > 0 if c == "1" else float(r["group_output"]) <= 0
                        for r in test if r["group_true"] == c]) for c in ("0", "1")]
    assert metrics["test"]["balanced_accuracy"] == pytest.approx(np.mean(recalls))

    assert main(["evaluate", str(run), "--store", str(store), "--out", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())["model"]
    assert evaluated["test"]["auroc"] == pytest.approx(metrics["test"]["auroc"])  # same best model, same windows
    assert evaluated["train"]["n_subjects"] == sum(1 for s in splits.values() if s == "train")

    assert main(["predict", str(run), "--store", str(store), "--out", str(tmp_path / "p.tsv")]) == 0
    rows = read_tsv(tmp_path / "p.tsv")
    assert len(rows) == N_SUBJECTS and {"group_output", "group_predicted", "group_true"} <= set(rows[0])
    shown = capsys.readouterr().err  # the progress of the windows of predict and evaluate, and of the final scoring
    assert "predict: 20/20 (100%) window" in shown and "\r" not in shown
    assert main(["evaluate", str(run), "--store", str(store), "--quiet", "true"]) == 0
    assert "evaluate " not in capsys.readouterr().err

    # the model meets a store prepared otherwise than its input contract: refused, or warned for the TR
    cohort = Path(read_tsv(store / "manifest.tsv")[0]["source"]).parents[2]
    assert prepare(cohort, tmp_path / "centred", replace(OPTIONS, normalization="voxel_center"), progress=False).ok
    for command in ("predict", "evaluate"):
        assert main([command, str(run), "--store", str(tmp_path / "centred"), "--out", str(tmp_path / "x")]) == 1
        assert (f"the model {run / 'model'} expects input of normalisation global_zscore, but the store "
                f"{tmp_path / 'centred'} has voxel_center; prepare the data for it with neurox prepare ... --like "
                f"{run / 'model'}") in capsys.readouterr().err
    slow = tmp_path / "slow"
    bids_run(slow, "00", n_frames=40).with_name(
        "sub-00_task-rest_run-1_space-MNI152NLin2009cAsym_res-4_desc-preproc_bold.json").write_text(
        '{"RepetitionTime": 3.0}')
    (slow / "participants.tsv").write_text("participant_id\tgroup\nsub-00\t1\n")
    assert prepare(slow, tmp_path / "slow-store", OPTIONS, progress=False).ok
    assert main(["predict", str(run), "--store", str(tmp_path / "slow-store"), "--out", str(tmp_path / "s.tsv")]) == 0
    assert (f"warning: the model {run / 'model'} was trained on runs of TR 2 s and the store {tmp_path / 'slow-store'} "
            "has TR 3 s: its 20-frame windows span 60 s here, not 40 s (neurox prepare ... --resample_tr 2 gives the "
            "store the model's TR)") in capsys.readouterr().err
    # as the warning says: the same run resampled onto the model's TR
    assert prepare(slow, tmp_path / "slow-2s", replace(OPTIONS, resample_tr=2.0), progress=False).ok
    assert main(["predict", str(run), "--store", str(tmp_path / "slow-2s"), "--out", str(tmp_path / "f.tsv")]) == 0
    assert "warning" not in capsys.readouterr().err

    # an interrupted predict resumes from the participants' outputs it kept (another model's are discarded); a
    # participant whose run is damaged is one line, and the others are predicted
    from neurox.hub import weights_digest
    from neurox.io.claim import kept_parts
    from neurox.io.npz import save_npy

    before = {r["participant_id"]: float(r["group_output"]) for r in rows}
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    shard = damaged / "runs" / "sub-03_task-rest_run-1.zarr" / "c" / "0" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:100])
    settings = {"model": weights_digest(run / "model"), "store": str(damaged.resolve())}
    for name, kept_settings in (("resumed", settings), ("stale", {**settings, "model": "another"})):
        cache = kept_parts(tmp_path / f"{name}.tsv", kept_settings)
        save_npy(cache / "sub-01.npy", np.full((2, 1), 7.0, np.float32))  # sub-01's two windows, marked
        assert main(["predict", str(run), "--store", str(damaged), "--out", str(tmp_path / f"{name}.tsv")]) == 0
        assert not cache.exists()
        assert f"neurox predict: sub-03: {shard}: the run's frame index cannot be read" in capsys.readouterr().err
        after = {r["participant_id"]: float(r["group_output"]) for r in read_tsv(tmp_path / f"{name}.tsv")}
        assert "sub-03" not in after and len(after) == N_SUBJECTS - 1
        assert after["sub-01"] == (7.0 if name == "resumed" else pytest.approx(before["sub-01"], abs=1e-5))
        assert all(after[p] == pytest.approx(before[p], abs=1e-5) for p in after if p != "sub-01")
    # evaluate keeps the same parts beside its --out (the same loop): the damaged participant is one line too
    assert main(["evaluate", str(run), "--store", str(damaged), "--out", str(tmp_path / "d.json")]) == 0
    assert f"neurox evaluate: sub-03: {shard}: the run's frame index cannot be read" in capsys.readouterr().err
    scored = json.loads((tmp_path / "d.json").read_text())["model"]
    assert sum(m["n_subjects"] for m in scored.values()) == N_SUBJECTS - 1
    assert not (tmp_path / ".d.json.parts").exists()


def test_evaluate_compares_two_runs_on_the_same_participants(store, one_epoch_run, tmp_path, capsys):
    """--compare: another run of the same targets scored alike, and each metric's paired difference (a pretrained
    run beside a scratch one); runs of other targets do not compare."""
    first, second = one_epoch_run, tmp_path / "b"
    assert main(finetune_args(store, second, "--epochs", "1", "--lr", "3e-4")) == 0
    out = tmp_path / "compared.json"
    assert main(["evaluate", str(first), "--store", str(store), "--compare", str(second), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "model_minus_compared\n  train: accuracy_diff " in printed.out and "warning" not in printed.err
    results = json.loads(out.read_text())
    assert set(results) == {"model", "compared", "model_minus_compared"}
    paired = results["model_minus_compared"]["train"]
    assert paired["auroc_diff"] == pytest.approx(results["model"]["train"]["auroc"]
                                                 - results["compared"]["train"]["auroc"])
    assert {"auroc_diff_ci_low", "auroc_diff_p"} <= set(paired) and paired["n_subjects"] == 6
    assert not list(tmp_path.glob(".compared.json*.parts"))  # what it kept to resume, gone once written
    other = tmp_path / "score"
    args = finetune_args(store, other, "--epochs", "1")
    args[args.index("group")] = "score"
    assert main(args) == 0
    assert main(["evaluate", str(first), "--store", str(store), "--compare", str(other)]) == 1
    assert "its targets differ from" in capsys.readouterr().err
    # a run split otherwise is compared on the participants both held out alike, and said so
    reseeded = tmp_path / "seed"
    assert main(finetune_args(store, reseeded, "--epochs", "1", "--seed", "7")) == 0
    capsys.readouterr()
    results = api.evaluate(first, store, compare=reseeded, quiet=True)
    err = capsys.readouterr().err
    splits = [load_splits(d / "splits.tsv") for d in (first, reseeded)]
    for split in ("train", "test"):
        mine = {p for p, s in splits[0].items() if s == split}
        both = mine & {p for p, s in splits[1].items() if s == split}
        if len(both) < len(mine):
            assert (f"warning: --compare {reseeded} scored {len(both)} of this run's {len(mine)} {split} participants "
                    f"as {split} participants") in err
        if len(both) >= 3:
            assert results["model_minus_compared"][split]["n_subjects"] == len(both)
    assert splits[0] != splits[1] and f"warning: --compare {reseeded} scored " in err


def test_regression_and_several_targets(store, tmp_path):
    run = tmp_path / "run"
    args = finetune_args(store, run, "--epochs", "1", "--split_fractions", "[0.4,0.3,0.3]")
    args[args.index("group")] = "score,group"
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    assert {"score.mae", "score.r2", "score.pearson_r", "group.auroc"} <= set(metrics)
    targets = json.loads((run / "targets.json").read_text())["targets"]
    train = [p for p, s in ((r["participant_id"], r["split"]) for r in read_tsv(run / "splits.tsv")) if s == "train"]
    scores = [int(p[4:]) * 1.5 + 20 for p in train]
    assert targets[0]["mean"] == pytest.approx(np.mean(scores))  # standardised on training participants only
    # the gap and its correction, fitted on the 3 validation participants: their corrected gaps are the residuals
    # of that fit (mean 0, uncorrelated with the score), and predict applies the run's fit as it is
    rows = read_tsv(run / "predictions.tsv")
    assert targets[0]["gap_fit"] is not None and targets[1]["gap_fit"] is None  # the class target has no gap
    for row in rows:
        assert float(row["score_gap"]) == pytest.approx(float(row["score_predicted"]) - float(row["score_true"]),
                                                        abs=2e-6)
    val = [r for r in rows if r["split"] == "val"]
    true, corrected = (np.array([float(r[c]) for r in val]) for c in ("score_true", "score_gap_corrected"))
    assert len(val) == 3 and abs(corrected.mean()) < 1e-5 and abs(np.dot(corrected, true - true.mean())) < 1e-3
    assert main(["predict", str(run), "--store", str(store), "--out", str(tmp_path / "p.tsv"), "--quiet", "true"]) == 0
    again = {r["participant_id"]: r for r in read_tsv(tmp_path / "p.tsv")}
    assert all(again[r["participant_id"]]["score_gap_corrected"] == r["score_gap_corrected"] for r in rows)
    assert all(r["score_gap_corrected"] != "" for r in again.values())  # training participants' too


def test_the_corrected_gap_does_not_follow_the_true_value():
    """Predictions shrunk towards the mean (what any imperfect model does) give the oldest a negative raw gap and
    the youngest a positive one; the gap corrected on validation participants does not follow age on test."""
    from neurox.data.loader import Target
    from neurox.train.runs import add_gaps

    rng = np.random.default_rng(0)
    age = rng.uniform(20, 80, 400)
    predicted = 50 + 0.6 * (age - 50) + rng.normal(0, 4, 400)  # shrunk, plus noise
    rows = [{"participant_id": f"p{i}", "split": "val" if i < 200 else "test", "age_predicted": float(predicted[i]),
             "age_true": f"{age[i]:.3f}"} for i in range(400)]
    rows.append({"participant_id": "new", "split": "external", "age_predicted": 61.0, "age_true": ""})
    target = Target("age", "regression", mean=50.0, std=17.0)
    assert add_gaps([target], rows) and target.gap_fit[1] == pytest.approx(-0.4, abs=0.05)
    test = [r for r in rows if r["split"] == "test"]
    true = [float(r["age_true"]) for r in test]
    assert np.corrcoef(true, [r["age_gap"] for r in test])[0, 1] < -0.8
    assert abs(np.corrcoef(true, [r["age_gap_corrected"] for r in test])[0, 1]) < 0.15
    assert "age_gap" not in rows[-1]  # no true value, no gap
    fit = list(target.gap_fit)
    assert not add_gaps([target], rows[200:]) and target.gap_fit == fit  # kept, not refitted


@pytest.mark.parametrize(
    "change,message",
    [
        (("--target", "age"), "no target column 'age'"),
        (("--preset", "swift_paper"), "the model takes a (96, 96, 96) grid but the store"),
        (("--task", "binary"), "has 3 distinct values; a binary target needs exactly 2"),
    ],
)
def test_bad_input_is_one_clear_line_before_training(store, tmp_path, capsys, change, message):
    args = finetune_args(store, tmp_path / "run")
    if change[0] == "--task":
        args[args.index("group")] = "site"
    if change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += list(change)
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_multiclass_predictions_carry_each_class_probability(store, tmp_path):
    args = finetune_args(store, tmp_path / "run", "--epochs", "1")
    args[args.index("group")] = "site"  # a, b, c
    assert main(args) == 0
    rows = read_tsv(tmp_path / "run" / "predictions.tsv")
    columns = [f"site_probability_{label}" for label in ("a", "b", "c")]
    assert [c for c in rows[0] if c.startswith("site_")] == [*columns, "site_predicted", "site_true"]
    for row in rows:
        probabilities = [float(row[c]) for c in columns]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert row["site_predicted"] == "abc"[int(np.argmax(probabilities))]


def test_store_without_phenotypes(tmp_path, capsys):
    path = bids_run(tmp_path / "d", "01")
    prepare(path, tmp_path / "store", OPTIONS, progress=False)
    assert main(finetune_args(tmp_path / "store", tmp_path / "run")) == 1
    assert "has no phenotype table" in capsys.readouterr().err


def test_non_finite_loss_stops_with_step_and_participants(store, tmp_path, capsys):
    assert main(finetune_args(store, tmp_path / "run", "--lr", "1e30", "--clip_grad", "0", "--warmup_fraction",
                              "0")) == 1
    err = capsys.readouterr().err
    assert "at step" in err and "batch participants: sub-" in err


def test_fine_tuning_from_a_linear_probe(store, tmp_path):
    """--head_init probe: the head starts as the closed-form probe of the standardised features of every
    window of every training participant, so at step 0 it scores held-out participants as `neurox probe`
    does; in training it standardises with each batch's statistics, and the saved model's statistics are
    those of its own (moved) backbone. --val_every validates within epochs too."""
    from neurox.analysis.baseline import fit_linear, linear_outputs
    from neurox.analysis.probe import participant_embeddings
    from neurox.data.loader import Target, evaluation_items
    from neurox.hub import load_pretrained
    from neurox.models import SwiFT, build_head
    from neurox.train.distributed import detect
    from neurox.train.finetune import FinetuneConfig, initialise_head, prepare_cohort, training_features
    from neurox.train.metrics import aggregate
    from neurox.train.objectives import selection_score
    from neurox.train.runs import window_outputs

    head = build_head("binary", 8, standardize=True)
    head.batch_statistics = True
    features = torch.randn(6, 8, 2, 1, 1, 1)
    assert torch.allclose(head.train()(features), head(features + 5.0), atol=1e-4)  # batch statistics
    assert not torch.allclose(head.eval()(features), head(features + 5.0))  # the fixed ones

    run = tmp_path / "run"
    assert main(finetune_args(store, run, "--head_init", "probe", "--lr", "1e-3", "--val_every", "4")) == 0
    # the probe alone is validated at step 0, before any training step, and is a candidate for model/
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "val" in records[0] and "loss" not in records[0]
    # then every 4 steps and at each epoch's end (6 steps an epoch: 6 training participants x 2 windows / 2)
    assert [r["step"] for r in records if "val" in r] == [0, 4, 6, 8, 12]
    targets = [Target(**t) for t in json.loads((run / "targets.json").read_text())["targets"]]
    validated = [(r["step"], selection_score(targets, r["val"])) for r in records if "val" in r]
    best_step = next(step for step, score in validated if score == max(score for _, score in validated))
    assert json.loads((run / "model" / "config.json").read_text())["source"]["step"] == best_step
    config = FinetuneConfig(store=str(store), target="group", out=str(run), batch_size=2, loader_workers=0)
    cohort = prepare_cohort(config, Store(store), run, 20)
    env = detect("cpu")
    model = load_pretrained(run / "model").eval()
    assert model.head.standardize
    # the statistics of the windows it was last calibrated on: the probe's at step 0, later the training windows'
    pooled, labels, who = training_features(model, store, cohort, 20, (48, 48, 48), env, config,
                                            every_window=best_step == 0)
    assert torch.allclose(model.head.feature_mean, pooled.mean(0), atol=1e-5)
    assert torch.allclose(model.head.feature_std, pooled.std(0), atol=1e-5)

    # the probe that starts the head reads every window of every training participant, as `neurox probe` does
    pooled, labels, who = training_features(model, store, cohort, 20, (48, 48, 48), env, config, every_window=True)
    owner = {run_id: p for p, run_ids in cohort.runs.items() for run_id in run_ids}
    assert who == [owner[run_id] for run_id, _ in evaluation_items(cohort, cohort.in_split("train"), 20)]
    fresh = SwiFT(model.config, build_head("binary", model.num_features, standardize=True)).eval()
    fresh.load_state_dict(model.state_dict())  # the same backbone, so that `neurox probe` below reads the same
    fresh.head.calibrate(pooled)
    initialise_head(fresh, cohort.targets, pooled, labels, who, seed=0)
    # the closed-form probe of the training participants' mean standardised features
    standardised = (pooled - pooled.mean(0)) / pooled.std(0)
    participants = sorted(set(who))
    assert set(participants) == set(cohort.in_split("train"))
    means = torch.stack([standardised[[i for i, q in enumerate(who) if q == p]].mean(0) for p in participants])
    y = np.array([float(cohort.values[p][0]) for p in participants])
    expected = linear_outputs(fit_linear(means.double().numpy(), y, "binary", 0), means.double().numpy())[:, 0]
    logits = fresh.head.head(means).detach().double().numpy()[:, 0]
    slope, offset = np.polyfit(expected, logits, 1)  # the same direction, rescaled to single windows
    assert slope > 0 and np.allclose(logits, slope * expected + offset, atol=1e-4)
    # so at step 0 the head scores the held-out participants as `neurox probe` does, up to slope and offset
    held_out = cohort.in_split("val") + cohort.in_split("test")
    embeddings = participant_embeddings(fresh, Store(store), sorted(cohort.in_split("train")) + held_out)
    train = sorted(cohort.in_split("train"))
    probe_fit = fit_linear(np.stack([embeddings[p] for p in train]),
                           np.array([float(cohort.values[p][0]) for p in train]), "binary", 0)
    windows, outputs = window_outputs(fresh, store, cohort, held_out, 20, (48, 48, 48), env, 2)
    subjects, head_scores = aggregate(windows, outputs)
    probe_scores = linear_outputs(probe_fit, np.stack([embeddings[p] for p in subjects]))[:, 0]
    slope, offset = np.polyfit(probe_scores, head_scores[:, 0], 1)
    assert len(subjects) >= 3 and slope > 0
    assert np.allclose(head_scores[:, 0], slope * probe_scores + offset, atol=1e-4)


def test_fine_tuning_a_per_position_head(store, tmp_path, capsys):
    """--head_pool tokens: the head reads each last-stage position's mean and standard deviation over the
    window's frames, starts as their probe, and the saved model reads the same and evaluates."""
    from neurox.hub import load_pretrained

    run = tmp_path / "run"
    assert main(finetune_args(store, run, "--head_pool", "tokens", "--head_init", "probe")) == 0
    model = load_pretrained(run / "model")
    x, y, z, _ = model.config.stage_grid(model.config.num_stages - 1)
    assert (model.head.pool, model.head.positions) == ("tokens", x * y * z)
    assert model.head.feature_count == 2 * model.num_features * x * y * z
    assert np.isfinite(json.loads((run / "metrics.json").read_text())["test"]["auroc"])
    assert main(finetune_args(store, tmp_path / "bad", "--head_pool", "max")) == 1
    assert main(finetune_args(store, tmp_path / "bad", "--val_every", "-1")) == 1
    for option, value, wanted in (("--batch_size", "0", "1 or more"), ("--accumulation", "0", "1 or more"),
                                  ("--epochs", "0", "1 or more"), ("--lr", "-1", "0 or more (0: nothing trains)")):
        capsys.readouterr()
        assert main(finetune_args(store, tmp_path / "bad", option, value)) == 1
        shown = float(value) if option == "--lr" else value
        assert capsys.readouterr().err.strip() == f"neurox finetune: error: {option} {shown}: give {wanted}"
    assert not (tmp_path / "bad").exists()  # refused before the run's folder is made


# --- processes: distributed parity and SIGTERM resume ----------------------------------------------


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(store, one_process_run, tmp_path, strategy):
    one, two = one_process_run, tmp_path / "two"
    args = finetune_args(store, two, "--device", "cpu", "--strategy", strategy)
    args[args.index("--batch_size") + 1] = "1"  # 2 processes x 1 = the same global batch of 2
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "neurox.cli", *args], env=ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for split in ("val", "test"):
        for name in ("auroc", "accuracy", "balanced_accuracy", "n_subjects"):
            assert m1[split][name] == pytest.approx(m2[split][name], abs=1e-6), (split, name)
    w1, w2 = (load_file(str(d / "model" / "model.safetensors")) for d in (one, two))
    # all-reduce sums gradients in another order than one process does; Adam divides by sqrt(v), which
    # turns rounding-level differences of near-zero gradients into steps of up to lr (1e-4) each
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < 1e-3, worst


def test_an_output_that_cannot_be_written_is_one_line(store, one_epoch_run, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "p.tsv"
    assert main(["predict", str(one_epoch_run), "--store", str(store), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("neurox predict: error: [Errno 20] Not a directory: ")
    assert "Traceback" not in err


def test_a_batch_of_no_windows_is_refused_by_the_parser(store, one_epoch_run, tmp_path, capsys):
    for command in (["predict", str(one_epoch_run), "--out", str(tmp_path / "p.tsv")],
                    ["evaluate", str(one_epoch_run)]):
        with pytest.raises(SystemExit):
            main([*command, "--store", str(store), "--batch_size", "0"])
        assert 'Parser key "batch_size"' in capsys.readouterr().err
    assert not (tmp_path / "p.tsv").exists()


def test_out_of_accelerator_memory_is_one_line_with_the_options_that_need_less(store, monkeypatch, tmp_path, capsys):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "79.10 GiB of which 1.05 GiB is free. Including non-PyTorch memory, ...")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", exhausted)
    assert main(finetune_args(store, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "neurox finetune: error: CUDA out of memory. Tried to allocate 2.00 GiB; what needs less: a lower "
        "--batch_size (--accumulation keeps the global batch), --grad_checkpointing true, --precision bf16; "
        "--resume true goes on from the last checkpoint")
    assert "Traceback" not in err


def test_a_validation_run_that_cannot_be_read_stops_training_with_one_line_on_every_process(store, one_process_run,
                                                                                           tmp_path, capsys):
    """Under FSDP the forward is a collective: a process that cannot read its batch must not leave the other in it."""
    last_val = [r["participant_id"] for r in read_tsv(one_process_run / "splits.tsv") if r["split"] == "val"][-1]
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    shard = damaged / "runs" / f"{last_val}_task-rest_run-1.zarr" / "c" / "0" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:100])
    line = f"neurox finetune: error: {shard}: the run's frame index cannot be read"
    assert main(finetune_args(damaged, tmp_path / "one", "--epochs", "1")) == 1
    err = capsys.readouterr().err
    assert line in err and "Traceback" not in err
    args = finetune_args(damaged, tmp_path / "two", "--device", "cpu", "--strategy", "fsdp", "--epochs", "1")
    args[args.index("--batch_size") + 1] = "1"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "neurox.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert done.stderr.count(line) == 2, done.stderr[-3000:]  # each process stops on it, at the same batch
    assert "collective mismatch" not in done.stderr


def test_predict_and_evaluate_on_two_processes_share_the_windows_and_survive_a_damaged_run(store, one_epoch_run,
                                                                                          tmp_path):
    """Under a launcher the processes each score part of the windows and the first writes what one process would
    (with the FC baseline, which the first scores alone once the others are done); a run that one process cannot
    read is one line and left out, and no process is left waiting for another."""
    run, fc = one_epoch_run, tmp_path / "fc"
    assert main(["baseline", "--store", str(store), "--target", "group", "--atlas", str(three_parcel_atlas(tmp_path)),
                 "--split_from", str(run), "--out", str(fc), "--n_boot", "20", "--quiet", "true"]) == 0
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    shard = damaged / "runs" / "sub-03_task-rest_run-1.zarr" / "c" / "0" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:100])
    for command, out in (("predict", "p.tsv"), ("evaluate", "e.json")):
        args = [command, str(run), "--store", str(damaged), "--batch_size", "1",
                *(["--baseline", str(fc)] if command == "evaluate" else [])]
        assert main([*args, "--out", str(tmp_path / f"one-{out}")]) == 0
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               str(free_port()), "-m", "neurox.cli", *args, "--out", str(tmp_path / f"two-{out}")],
                              env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stderr.count(f"neurox {command}: sub-03: {shard}: the run's frame index cannot be read") == 1
        assert not (tmp_path / f".two-{out}.parts").exists()
    one, two = (read_tsv(tmp_path / f"{n}-p.tsv") for n in ("one", "two"))
    assert [r["participant_id"] for r in two] == [r["participant_id"] for r in one] and len(one) == N_SUBJECTS - 1
    assert all(float(a["group_output"]) == pytest.approx(float(b["group_output"]), abs=1e-5) for a, b in zip(one, two))
    one, two = (json.loads((tmp_path / f"{n}-e.json").read_text()) for n in ("one", "two"))
    assert list(one) == list(two) == ["model", "fc_baseline", "model_minus_fc_baseline"]
    assert one["fc_baseline"] == two["fc_baseline"]  # the baseline is scored by one process either way
    for key in ("model", "model_minus_fc_baseline"):
        assert one[key].keys() == two[key].keys() and one[key]
        for split in one[key]:
            for name in ("auroc", "auroc_diff", "accuracy", "n_subjects"):
                if name in one[key][split]:
                    assert one[key][split][name] == pytest.approx(two[key][split][name], abs=1e-6, nan_ok=True), \
                        (key, split, name)


def test_a_command_that_runs_in_one_process_refuses_a_launchers_many(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["synth", str(tmp_path / "cohort"), "--n_subjects", "2"]) == 1
    assert ("neurox synth: error: runs in one process, and the launcher started 2; run it without torchrun, srun or "
            "mpiexec") in capsys.readouterr().err
    assert not (tmp_path / "cohort").exists()


def test_ctrl_c_passed_on_by_a_launcher_is_not_a_second_press():
    """torchrun passes a terminal's Ctrl-C on to workers that had it already: that echo must not cancel the
    checkpoint the first one asked for; a second press a moment later stops at once."""
    from neurox.train.engine import StopSignals

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even in a background job
    try:
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the launcher's copy
            time.sleep(0.05)
            assert signals.received == "Ctrl-C (SIGINT)"
            time.sleep(1.1)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(store, one_process_run, tmp_path):
    reference, resumed = one_process_run, tmp_path / "resumed"
    args = finetune_args(store, resumed, "--device", "cpu")
    returncode, out = run_until_step_then_signal(args, resumed, step=2)
    assert returncode == 0 and "stopped by SIGTERM at step" in out
    assert "(stopped)" in out and "(done)" not in out  # the progress line says where the run stopped
    stopped_at = consolidated_state(resumed / "checkpoints" / "last")["step"]
    assert 2 <= stopped_at < 8  # mid-run: the reference takes 8 steps
    subprocess.run([sys.executable, "-m", "neurox.cli", *args, "--resume", "true"], check=True, env=ENV,
                   capture_output=True)
    a = consolidated_state(reference / "checkpoints" / "last")
    b = consolidated_state(resumed / "checkpoints" / "last")
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-6), key


@pytest.mark.parametrize(
    "variables,expected",
    [
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1)),  # torchrun
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, (5, 16, 1)),  # srun
        ({"PMI_RANK": "7", "PMI_SIZE": "12", "PALS_LOCAL_RANKID": "3"}, (7, 12, 3)),  # mpiexec on PBS (Aurora)
        ({}, (0, 1, 0)),  # a plain process
    ],
)
def test_launcher_detection(monkeypatch, variables, expected):
    from neurox.train.distributed import LOCAL_VARS, RANK_VARS, SIZE_VARS, detect

    for name in (*RANK_VARS, *SIZE_VARS, *LOCAL_VARS):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    env = detect("cpu")
    assert (env.rank, env.world_size, env.local_rank) == expected
    assert env.is_main == (expected[0] == 0)


def test_a_device_that_is_not_there_is_one_line(store, tmp_path, capsys):
    absent = "xpu" if torch.accelerator.is_available() else "cuda"
    assert main(finetune_args(store, tmp_path / "run", "--device", absent)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"neurox finetune: error: --device {absent}: torch {torch.__version__} finds no {absent} "
                          "device") and "--device auto takes the accelerator there is, else the CPU" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_each_process_takes_its_own_device_or_the_one_it_was_given():
    from neurox.train.distributed import device_index

    assert [device_index(local, "cuda", visible=4) for local in range(4)] == [0, 1, 2, 3]  # torchrun: all visible
    assert [device_index(local, "xpu", visible=1) for local in range(4)] == [0, 0, 0, 0]  # bound one per process
    with pytest.raises(ValueError, match="local rank 5 of its node, and sees 4 cuda devices"):
        device_index(5, "cuda", visible=4)


def test_yaml_config_and_resolved_options_saved(store, tmp_path):
    import yaml

    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump({"store": str(store), "target": "group", "out": str(tmp_path / "run"),
                                      "epochs": 1, "batch_size": 2, "lr": 2e-4, "n_boot": 20, "loader_workers": 0}))
    assert main(["finetune", "--config", str(config), "--seed", "3"]) == 0
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (resolved["lr"], resolved["seed"], resolved["epochs"]) == (2e-4, 3, 1)  # file, then flag
    assert resolved["model"]["img_size"] == [48, 48, 48, 20] and resolved["world_size"] == 1
    environment = resolved["environment"]  # what the numbers depend on beyond the options
    assert (environment["torch"], environment["device"]) == (torch.__version__, "cpu")
    manifest = hashlib.sha256((store / "manifest.tsv").read_bytes()).hexdigest()
    assert environment["stores"] == {str(store): manifest}


# --- a phenotype table by session (longitudinal cohorts) ------------------------------------------------


def test_sessions_are_units_and_a_participant_stays_in_one_split(tmp_path, capsys):
    from fakes import AFFINE, brain_mask, save

    from neurox.data.loader import load_cohort, prepared_runs, split_participants
    from neurox.train.pretrain import ParticipantPairs

    root = tmp_path / "bids"
    sessions = {"baselineYear1Arm1": "baseline_year_1_arm_1", "2YearFollowUpYArm1": "2_year_follow_up_y_arm_1"}
    rows = ["src_subject_id,eventname,age"]
    for i in range(8):
        for j, (label, event) in enumerate(sessions.items()):
            func = root / f"sub-NDARINV{i:02d}" / f"ses-{label}" / "func"
            stem = f"sub-NDARINV{i:02d}_ses-{label}_task-rest_space-MNI152NLin2009cAsym_res-4"
            save(func / f"{stem}_desc-preproc_bold.nii.gz", bold(n_frames=20, seed=10 * i + j))
            save(func / f"{stem}_desc-brain_mask.nii.gz", brain_mask().astype(np.uint8))
            rows.append(f"NDAR_INV{i:02d},{event},{9 + 2 * j + 0.1 * i:.1f}")  # ABCD's ids and event names
    (tmp_path / "abcd.csv").write_text("\n".join(rows) + "\n")
    assert main(["prepare", str(root), "--out", str(tmp_path / "store"), "--voxel_size", "4", "--min_frames", "8",
                 "--participants", str(tmp_path / "abcd.csv"), "--id_column", "src_subject_id",
                 "--session_column", "eventname", "--quiet", "true"]) == 0
    assert "16 of 16 participant sessions with runs have a row" in capsys.readouterr().out
    store = Store(tmp_path / "store")
    table = read_tsv(tmp_path / "store" / "participants.tsv")
    assert list(table[0]) == ["participant_id", "session", "age"] and store.by_session
    assert (table[1]["participant_id"], table[1]["session"], table[1]["age"]) == (
        "sub-NDARINV00", "2YearFollowUpYArm1", "11.0")
    units = prepared_runs(store)[0]
    assert store.units_of(["sub-NDARINV03", "sub-NDARINV04_ses-baselineYear1Arm1", "sub-X"], list(units)) == (
        ["sub-NDARINV03_ses-2YearFollowUpYArm1", "sub-NDARINV03_ses-baselineYear1Arm1",
         "sub-NDARINV04_ses-baselineYear1Arm1"], ["sub-X"])  # a participant names each of their sessions
    assert len(units) == 16 and units["sub-NDARINV03_ses-2YearFollowUpYArm1"] == [
        "sub-NDARINV03_ses-2YearFollowUpYArm1_task-rest"]
    # pretraining's instances are people: a person's two sessions give positives, never negatives
    assert {len(runs) for runs in ParticipantPairs([store], 8, (48, 48, 48), seed=0).runs[0].values()} == {2}
    cohort = load_cohort(store, ["age"])
    assert cohort.values["sub-NDARINV03_ses-baselineYear1Arm1"] == ["9.3"]  # each session its own age
    split = split_participants(cohort, seed=0)
    for i in range(8):
        assert len({split[f"sub-NDARINV{i:02d}_ses-{label}"] for label in sessions}) == 1

    run = tmp_path / "run"
    assert main(["finetune", "--store", str(tmp_path / "store"), "--target", "age", "--out", str(run), "--epochs",
                 "1", "--batch_size", "2", "--n_boot", "20", "--loader_workers", "0", "--max_steps", "2"]) == 0
    predictions = read_tsv(run / "predictions.tsv")
    assert {p["participant_id"] for p in predictions} <= set(units) and len(predictions) % 2 == 0
    assert list(predictions[0])[:4] == ["participant_id", "person", "session", "split"]
    assert predictions[0]["participant_id"] == f"{predictions[0]['person']}_ses-{predictions[0]['session']}"
    atlas = tmp_path / "atlas.nii.gz"
    labels = np.zeros(bold(1).shape[:3], dtype=np.int16)
    labels[5:20, 10:25, 10:20], labels[20:35, 10:25, 10:20], labels[10:30, 25:40, 20:30] = 1, 2, 3
    save(atlas, labels, AFFINE)
    assert main(["baseline", "--store", str(tmp_path / "store"), "--target", "age", "--atlas", str(atlas), "--out",
                 str(tmp_path / "fc"), "--split_from", str(run), "--n_boot", "20"]) == 0
    metrics = json.loads((tmp_path / "fc" / "metrics.json").read_text())
    assert metrics["test"]["n_subjects"] == json.loads((run / "metrics.json").read_text())["test"]["n_subjects"]
    # the baseline's age gaps, corrected by its own fit on the 4 validation sessions
    assert json.loads((tmp_path / "fc" / "targets.json").read_text())["targets"][0]["gap_fit"] is not None
    assert all(r["age_gap_corrected"] != "" for r in read_tsv(tmp_path / "fc" / "predictions.tsv"))
