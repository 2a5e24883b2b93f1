"""Balanced accuracy at the class decision recentred on the validation participants, against the trained model's own.

Per seed: ``neurox demo`` (a synthetic cohort, the SwiFT fine-tuned on three planted class targets, and the FC +
linear baseline on the same split), then the same recipe on a rare class, ``amplitude_rare``: the amplitude groups
with three of every four group-1 participants left out (about one participant in five is positive); and on
``effect3``, three classes of unequal size: ``amplitude`` (amplitude group 1), ``neither`` (amplitude and coupling
group 0) and ``coupling`` (amplitude 0, coupling 1; every second one left out, so about one participant in seven).
Every run saves its model recentred (``neurox.train.objectives.decision_thresholds``) and records what it moved by
in ``targets.json``, so each test output gives both decisions: recentred (output > 0, or the largest probability)
and the trained model's own (output + threshold > 0, or the largest log-probability plus each class's offset).
AUROC does not depend on either. Prints one JSON document and writes it to --out.

    python benchmarks/decision_threshold.py --out threshold --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from pretrain_probe import neurox  # the shared helper of the benchmark scripts: the CLI, logged

from neurox.data.store import read_tsv, write_tsv
from neurox.train.metrics import auroc, classification_metrics
from neurox.train.runs import read_targets

DEMO_TARGETS = ("amplitude_group", "coupling_group", "order_group")
RARE = "amplitude_rare"
THREE = "effect3"


def add_rare_column(store: Path) -> dict[str, int]:
    """``amplitude_rare`` in the store's participants.tsv: amplitude_group where it is 0, and for every fourth
    group-1 participant (by id); n/a for the others, which fine-tuning then leaves out."""
    path = store / "participants.tsv"
    rows = read_tsv(path)
    if RARE not in rows[0]:
        positives = sorted(r["participant_id"] for r in rows if r["amplitude_group"] == "1")
        kept = set(positives[::4])
        for r in rows:
            r[RARE] = "0" if r["amplitude_group"] == "0" else "1" if r["participant_id"] in kept else "n/a"
        write_tsv(path, rows, list(rows[0]))
    values = [r[RARE] for r in read_tsv(path)]
    return {"0": values.count("0"), "1": values.count("1")}


def add_three_class_column(store: Path) -> dict[str, int]:
    """``effect3`` in the store's participants.tsv (see the module's docstring); n/a for the participants left out."""
    path = store / "participants.tsv"
    rows = read_tsv(path)
    if THREE not in rows[0]:
        coupled = sorted(r["participant_id"] for r in rows
                         if r["amplitude_group"] == "0" and r["coupling_group"] == "1")
        kept = set(coupled[::2])
        for r in rows:
            r[THREE] = ("amplitude" if r["amplitude_group"] == "1" else "neither" if r["coupling_group"] == "0"
                        else "coupling" if r["participant_id"] in kept else "n/a")
        write_tsv(path, rows, list(rows[0]))
    values = [r[THREE] for r in read_tsv(path)]
    return {c: values.count(c) for c in ("amplitude", "neither", "coupling")}


def class_decisions(run: Path) -> dict:
    """``effect3``'s test metrics at both decisions: the largest probability (recentred), and the largest of each
    log-probability plus its class's offset (the trained model's own: the log-probabilities are the recentred
    logits less a number per participant, which no argmax sees)."""
    (target,) = read_targets(run)
    rows = [r for r in read_tsv(run / "predictions.tsv") if r["split"] == "test"]
    truth = np.array([target.classes.index(r[f"{THREE}_true"]) for r in rows])
    log_p = np.log(np.clip([[float(r[f"{THREE}_probability_{c}"]) for c in target.classes] for r in rows], 1e-12,
                           None))
    offsets = np.array(target.threshold)
    recentred, trained = classification_metrics(truth, log_p), classification_metrics(truth, log_p + offsets)
    return {"classes": target.classes, "offsets": offsets.tolist(), "n_test": len(rows),
            "n_test_per_class": np.bincount(truth, minlength=len(target.classes)).tolist(),
            "auroc": json.loads((run / "metrics.json").read_text())["test"]["auroc"],
            "balanced_accuracy_recentred": recentred["balanced_accuracy"],
            "balanced_accuracy_trained": trained["balanced_accuracy"],
            "accuracy_recentred": recentred["accuracy"], "accuracy_trained": trained["accuracy"],
            "predicted_recentred": np.bincount(log_p.argmax(1), minlength=len(offsets)).tolist(),
            "predicted_trained": np.bincount((log_p + offsets).argmax(1), minlength=len(offsets)).tolist(),
            "truth": truth.tolist(), "log_probability": log_p.tolist()}


def demo_recipe_and_baseline(demo: Path, column: str, name: str, seed: int, epochs: int, seconds: dict,
                             log: Path) -> tuple[Path, Path]:
    """The demo's SwiFT recipe (src/neurox/demo.py) on ``column`` of the demo's store, into runs/swift_NAME, and the
    FC baseline on its split, into runs/fc_NAME; each skipped where it has finished. The fine-tuning's seconds go to
    ``seconds`` as NAME-sSEED."""
    store, runs = demo / "store", demo / "runs"
    swift, fc = runs / f"swift_{name}", runs / f"fc_{name}"
    if not (swift / "metrics.json").is_file():
        seconds[f"{name}-s{seed}"] = neurox(
            "finetune", "--store", str(store), "--target", column, "--out", str(swift), "--preset", "demo",
            "--epochs", str(epochs), "--batch_size", "16", "--lr", "1e-4", "--seed", str(seed),
            "--loader_workers", "2", "--head_init", "probe", log=log)
    if not (fc / "metrics.json").is_file():
        atlas = next((demo / "cohort" / "ground_truth").glob("atlas-synthetic_space-*_dseg.nii.gz"))
        neurox("baseline", "--store", str(store), "--target", column, "--out", str(fc), "--atlas", str(atlas),
               "--split_from", str(swift), "--seed", str(seed), "--quiet", "true", log=log)
    return swift, fc


def balanced_accuracy(truth: np.ndarray, scores: np.ndarray) -> float:
    """At a decision of scores above 0, as neurox's metrics take it."""
    return classification_metrics(truth, scores[:, None])["balanced_accuracy"]


def decisions(run: Path, targets: tuple[str, ...]) -> dict:
    """Per target: test AUROC, balanced accuracy at both decisions, the threshold, and the test outputs' split."""
    thresholds = {t.column: t.threshold for t in read_targets(run)}
    rows = [r for r in read_tsv(run / "predictions.tsv") if r["split"] == "test"]
    result = {}
    for target in targets:
        truth = np.array([int(r[f"{target}_true"]) for r in rows])
        output = np.array([float(r[f"{target}_output"]) for r in rows])
        threshold = thresholds[target]
        result[target] = {
            "n_test": len(rows), "n_test_positive": int(truth.sum()), "threshold": threshold,
            "auroc": auroc(truth, output),
            "balanced_accuracy_recentred": balanced_accuracy(truth, output),
            "balanced_accuracy_trained": balanced_accuracy(truth, output + threshold),
            "share_above_trained_zero": float(np.mean(output + threshold > 0)),
            "truth": truth.tolist(), "output": output.tolist(),
        }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="decision-threshold")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--subjects", type=int, default=96)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    report: dict = {"benchmark": "decision_threshold", "args": vars(args), "seconds": {}, "runs": {}}
    for seed in args.seeds:
        demo = out / f"demo-s{seed}"
        if not (demo / "report.md").is_file():
            report["seconds"][f"demo-s{seed}"] = neurox("demo", "--out", str(demo), "--seed", str(seed),
                                                        "--n_subjects", str(args.subjects), "--epochs",
                                                        str(args.epochs), log=log)
        store, runs = demo / "store", demo / "runs"
        counts = add_rare_column(store)
        rare, rare_fc = demo_recipe_and_baseline(demo, RARE, "rare", seed, args.epochs, report["seconds"], log)
        three_counts = add_three_class_column(store)
        three, three_fc = demo_recipe_and_baseline(demo, THREE, "effect3", seed, args.epochs, report["seconds"], log)
        report["runs"][f"s{seed}"] = {
            "rare_counts": counts, "effect3_counts": three_counts,
            "swift_effect3": class_decisions(three), "fc_effect3": class_decisions(three_fc),
            "swift": decisions(runs / "swift", DEMO_TARGETS), "fc_baseline": decisions(runs / "fc_baseline",
                                                                                        DEMO_TARGETS),
            "swift_rare": decisions(rare, (RARE,)), "fc_rare": decisions(rare_fc, (RARE,)),
        }
        (out / "decision_threshold.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = {}  # per model and target: means over seeds, and balanced accuracy of every seed's test pooled
    for model, targets in (("swift", DEMO_TARGETS), ("fc_baseline", DEMO_TARGETS), ("swift_rare", (RARE,)),
                           ("fc_rare", (RARE,))):
        for target in targets:
            per_seed = [report["runs"][f"s{s}"][model][target] for s in args.seeds]
            truth = np.concatenate([r["truth"] for r in per_seed])
            recentred = np.concatenate([r["output"] for r in per_seed])
            trained = np.concatenate([np.array(r["output"]) + r["threshold"] for r in per_seed])
            summary[f"{model}/{target}"] = {
                "auroc_mean": float(np.mean([r["auroc"] for r in per_seed])),
                "balanced_accuracy_recentred_mean": float(np.mean([r["balanced_accuracy_recentred"]
                                                                   for r in per_seed])),
                "balanced_accuracy_trained_mean": float(np.mean([r["balanced_accuracy_trained"] for r in per_seed])),
                "balanced_accuracy_recentred_pooled": balanced_accuracy(truth, recentred),
                "balanced_accuracy_trained_pooled": balanced_accuracy(truth, trained),
                "n_test_pooled": int(len(truth)), "n_test_positive_pooled": int(truth.sum()),
            }
    for model in ("swift_effect3", "fc_effect3"):
        per_seed = [report["runs"][f"s{s}"][model] for s in args.seeds]
        truth = np.concatenate([r["truth"] for r in per_seed])
        log_p = np.concatenate([r["log_probability"] for r in per_seed])
        trained = np.concatenate([np.array(r["log_probability"]) + r["offsets"] for r in per_seed])
        summary[f"{model}/{THREE}"] = {
            "auroc_mean": float(np.mean([r["auroc"] for r in per_seed])),
            **{f"{m}_{d}_mean": float(np.mean([r[f"{m}_{d}"] for r in per_seed]))
               for m in ("balanced_accuracy", "accuracy") for d in ("recentred", "trained")},
            "balanced_accuracy_recentred_pooled": classification_metrics(truth, log_p)["balanced_accuracy"],
            "balanced_accuracy_trained_pooled": classification_metrics(truth, trained)["balanced_accuracy"],
            "n_test_pooled_per_class": np.bincount(truth, minlength=3).tolist(),
        }
    report["summary"] = summary
    (out / "decision_threshold.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
