"""Balanced accuracy at the class decision recentred on the validation participants, against the trained model's own.

Per seed: ``neurox demo`` (a synthetic cohort, the SwiFT fine-tuned on three planted class targets, and the FC +
linear baseline on the same split), then the same recipe on a rare class: ``amplitude_rare``, the amplitude groups
with three of every four group-1 participants left out (about one participant in five is positive). Every run
saves its model recentred (``neurox.train.objectives.decision_thresholds``) and records the threshold it moved by in
``targets.json``, so each test output gives both decisions: recentred (output > 0) and the trained model's own
(output + threshold > 0). AUROC does not depend on either. Prints one JSON document and writes it to --out.

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
        rare, rare_fc = runs / "swift_rare", runs / "fc_rare"
        if not (rare / "metrics.json").is_file():  # the demo's recipe (src/neurox/demo.py), on the rare class
            report["seconds"][f"rare-s{seed}"] = neurox(
                "finetune", "--store", str(store), "--target", RARE, "--out", str(rare), "--preset", "demo",
                "--epochs", str(args.epochs), "--batch_size", "16", "--lr", "1e-4", "--seed", str(seed),
                "--loader_workers", "2", "--head_init", "probe", log=log)
        if not (rare_fc / "metrics.json").is_file():
            atlas = next((demo / "cohort" / "ground_truth").glob("atlas-synthetic_space-*_dseg.nii.gz"))
            neurox("baseline", "--store", str(store), "--target", RARE, "--out", str(rare_fc), "--atlas", str(atlas),
                   "--split_from", str(rare), "--seed", str(seed), "--quiet", "true", log=log)
        report["runs"][f"s{seed}"] = {
            "rare_counts": counts,
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
    report["summary"] = summary
    (out / "decision_threshold.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
