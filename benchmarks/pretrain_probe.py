"""Does self-supervised pretraining help? The synthetic cohort's planted targets, end to end.

1. ``neurox synth`` + ``neurox prepare`` a cohort (4 mm grid).
2. For each seed: ``neurox pretrain`` (no labels) and a randomly initialised backbone of the same
   architecture; ``neurox probe`` of both on every planted target (same split per seed).
3. ``neurox finetune`` on a target from the first pretrained model and from scratch: validation score
   per epoch, and the first step at which the pretrained run reaches the scratch run's best.
4. ``neurox explain`` of the fine-tuned model on the test participants: the AUROC of the group
   attribution map against the target's ground-truth voxels (inside the brain), and its PNG.

Prints one JSON document and writes it, with the figures, to --out.

    python benchmarks/pretrain_probe.py --out pretrain-probe --subjects 32 --frames 100 --steps 20 --seeds 0
    python benchmarks/pretrain_probe.py --out pretrain-probe --device cuda --subjects 128 --frames 200 \\
        --steps 250 --seeds 0 1 2 --precision bf16 --batch 16 --workers 14
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TARGETS = ("amplitude_group", "coupling_group", "order_group", "lowfreq_score")


def neurox(*args: str, log: Path) -> float:
    started = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ neurox {' '.join(args)}\n")
        f.flush()
        subprocess.run([sys.executable, "-m", "neurox.cli", *args], check=True, stdout=f, stderr=subprocess.STDOUT)
    return round(time.perf_counter() - started, 1)


def random_model(out: Path, seed: int, preset: str) -> Path:
    import torch

    from neurox.config import InputContract
    from neurox.config import preset as get_preset
    from neurox.hub import save_pretrained
    from neurox.models import SwiFT

    torch.manual_seed(seed)
    config = get_preset(preset)
    return save_pretrained(SwiFT(config), out, contract=InputContract.for_model(config),
                           card={"notes": f"random initialisation, seed {seed}"})


def auroc_of_map(volume_path: Path, truth_path: Path, store: Path) -> float:
    """AUROC of a store-grid map's values for ground-truth voxels against the other in-brain voxels."""
    import nibabel as nib

    from neurox.analysis.connectivity import store_atlas
    from neurox.data.store import Store
    from neurox.train.metrics import auroc

    s = Store(store)
    truth, _ = store_atlas(s, truth_path)
    brain = s.mask(s.run_ids[0])
    values = np.asarray(nib.load(str(volume_path)).dataobj)
    return float(auroc((truth[brain] > 0).astype(int), values[brain]))


def explanation_scores(folder: Path, truth_path: Path, store: Path) -> dict[str, float]:
    """``auroc_of_map`` of an explain folder's mean map over all participants ("all") and of its
    contrast between the groups of ``--group_by`` ("contrast")."""
    contrasts = json.loads((folder / "explain.json").read_text())["contrasts"]
    names = {"all": "all", **({"contrast": next(iter(contrasts))} if contrasts else {})}
    return {key: auroc_of_map(folder / f"group-{name}_attribution.nii.gz", truth_path, store)
            for key, name in names.items()}


def val_curve(run: Path, key: str) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val"].get(key)) for r in records if "val" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="pretrain-probe")
    p.add_argument("--work", default=None, help="working folder (default: OUT/work)")
    p.add_argument("--subjects", type=int, default=32)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--steps", type=int, default=20, help="pretraining steps")
    p.add_argument("--objective", default="contrastive")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch", type=int, default=4, help="pretraining participants per step")
    p.add_argument("--finetune_target", default="coupling_group")
    p.add_argument("--finetune_epochs", type=int, default=4)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--explain_steps", type=int, default=8)
    p.add_argument("--normalization", default="global_zscore", help="the store's normalisation (neurox prepare)")
    args = p.parse_args()
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    report: dict = {"benchmark": "pretrain_probe", "args": vars(args), "timings_s": {}}
    cohort, store = work / "cohort", work / "store"
    report["timings_s"]["synth"] = neurox("synth", str(cohort), "--n_subjects", str(args.subjects), "--n_frames",
                                          str(args.frames), "--voxel_size", "4", "--workers", str(args.workers),
                                          "--quiet", "true", log=log)
    report["timings_s"]["prepare"] = neurox("prepare", str(cohort), "--out", str(store), "--voxel_size", "4",
                                            "--normalization", args.normalization, "--workers", str(args.workers),
                                            "--quiet", "true", log=log)

    def save() -> None:  # after every stage, so that a run cut short keeps what it measured
        (out / "pretrain_probe.json").write_text(json.dumps(report, indent=2) + "\n")

    common = ["--precision", args.precision, "--device", args.device, "--loader_workers", str(args.workers)]
    probes = []
    for seed in args.seeds:
        pretrained = work / f"pretrain-{seed}"
        shutil.rmtree(pretrained, ignore_errors=True)
        report["timings_s"][f"pretrain-{seed}"] = neurox(
            "pretrain", "--store", str(store), "--out", str(pretrained), "--objective", args.objective,
            "--batch_size", str(args.batch), "--epochs", "1000", "--max_steps", str(args.steps), "--seed", str(seed),
            *common, log=log)
        random_dir = random_model(work / f"random-{seed}", seed, "demo")
        for name, model in (("pretrained", pretrained / "model"), ("random", random_dir)):
            probe_dir = work / f"probe-{name}-{seed}"
            neurox("probe", str(model), "--store", str(store), "--target", ",".join(TARGETS), "--seed", str(seed),
                   "--out", str(probe_dir), "--device", args.device, log=log)
            metrics = json.loads((probe_dir / "metrics.json").read_text())["test"]
            probes.append({"seed": seed, "backbone": name, **{
                t: metrics.get(f"{t}.auroc", metrics.get(f"{t}.pearson_r")) for t in TARGETS}})
            report["probe_test"] = probes
            save()
    report["probe_test"] = probes  # AUROC for the groups, Pearson r for lowfreq_score
    for name in ("pretrained", "random"):
        rows = [r for r in probes if r["backbone"] == name]
        report.setdefault("probe_test_mean", {})[name] = {t: float(np.mean([r[t] for r in rows])) for t in TARGETS}

    target = args.finetune_target
    runs = {}
    for name, init in (("from_pretrained", str(work / f"pretrain-{args.seeds[0]}" / "model")), ("from_scratch", None)):
        run = work / f"finetune-{name}"
        shutil.rmtree(run, ignore_errors=True)
        report["timings_s"][f"finetune-{name}"] = neurox(
            "finetune", "--store", str(store), "--target", target, "--out", str(run), "--epochs",
            str(args.finetune_epochs), "--batch_size", "8", "--n_boot", "200", "--seed", "0",
            *(["--init", init] if init else []), *common, log=log)
        runs[name] = run
        report.setdefault("finetune", {})[name] = {
            "val_auroc_per_epoch": val_curve(run, "auroc"),
            "test": json.loads((run / "metrics.json").read_text())["test"].get("auroc")}
        save()
    scratch_best = max(v for _, v in report["finetune"]["from_scratch"]["val_auroc_per_epoch"])
    reached = [s for s, v in report["finetune"]["from_pretrained"]["val_auroc_per_epoch"] if v >= scratch_best]
    report["finetune"]["scratch_best_val"] = scratch_best
    report["finetune"]["pretrained_first_step_reaching_it"] = reached[0] if reached else None
    report["finetune"]["scratch_first_step_reaching_it"] = next(
        s for s, v in report["finetune"]["from_scratch"]["val_auroc_per_epoch"] if v >= scratch_best)

    best = max(runs, key=lambda k: max(v for _, v in report["finetune"][k]["val_auroc_per_epoch"]))
    explained = work / "explain"
    shutil.rmtree(explained, ignore_errors=True)
    report["timings_s"]["explain"] = neurox(
        "explain", str(runs[best]), "--store", str(store), "--split", "test", "--group_by", target, "--out",
        str(explained), "--n_steps", str(args.explain_steps), "--batch_size", "8", "--device", args.device, "--quiet",
        "true", log=log)
    truth = json.loads((cohort / "ground_truth" / "ground_truth.json").read_text())[target]["map"]
    report["explain"] = {"run": best, "target": target, "attribution_auroc_vs_ground_truth": explanation_scores(
        explained, cohort / "ground_truth" / truth, store)}
    for png in explained.glob("group-*_attribution.png"):
        shutil.copy(png, out / f"attribution_{target}_{png.name}")
    save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
