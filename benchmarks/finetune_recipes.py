"""Which fine-tuning recipe lets the demo SwiFT learn the planted amplitude effect from scratch?

Synthesises one cohort, prepares it once per store normalisation, then runs ``neurox finetune`` for
every recipe x seed at the same budget of training windows (several runs at once), and reports per
run the validation AUROC per epoch and the test AUROC of the best validation model, both at the
subject level, for every planted binary target. Prints one JSON document and writes it to --out
after every run.

    python benchmarks/finetune_recipes.py --out recipes --subjects 32 --windows 64 --recipes gz_3t_b4 --seeds 0
    python benchmarks/finetune_recipes.py --out recipes --device cuda --subjects 128 --windows 3000 \\
        --seeds 0 1 --parallel 4 --workers 14
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pretrain_probe import explanation_scores, neurox, val_curve  # the shared helpers of the benchmark scripts

TARGETS = ("amplitude_group", "coupling_group", "order_group")
NORMALIZATIONS = {"gz": "global_zscore", "vc": "voxel_center"}
TARGET_SETS = {"3t": ",".join(TARGETS), "amp": "amplitude_group", "coup": "coupling_group", "ord": "order_group"}


def recipe(name: str) -> dict:
    """``NORM_TARGETS_bBATCH[_lrLR][_wdWD][_winWINDOWS]``: for example ``vc_amp_b16_lr3e-4`` (a voxel_center
    store, the amplitude target alone, batch 16, peak learning rate 3e-4, the default window budget)."""
    norm, targets, batch, *rest = name.split("_")
    options = {"normalization": NORMALIZATIONS[norm], "targets": TARGET_SETS[targets], "batch_size": int(batch[1:]),
               "lr": 1e-4, "weight_decay": 0.05}
    for part in rest:
        if part.startswith("win"):
            options["windows"] = int(part[3:])
        else:
            options[{"lr": "lr", "wd": "weight_decay"}[part[:2]]] = float(part[2:])
    return options


DEFAULT_RECIPES = ["gz_3t_b4", "gz_amp_b4", "vc_3t_b4", "vc_amp_b4", "gz_3t_b16_lr3e-4", "vc_3t_b16_lr3e-4",
                   "gz_3t_b4_lr3e-5", "vc_3t_b4_lr3e-5", "gz_3t_b16", "vc_3t_b16", "gz_3t_b16_lr1e-3",
                   "vc_3t_b16_lr1e-3", "gz_3t_b16_lr3e-4_win6000", "vc_3t_b16_lr3e-4_win6000"]


def summary(run: Path, targets: list[str]) -> dict:
    single = len(targets) == 1
    curve = {t: [v for _, v in val_curve(run, "auroc" if single else f"{t}.auroc")] for t in targets}
    test = json.loads((run / "metrics.json").read_text())["test"]
    return {"val_auroc_per_epoch": curve,
            "test_auroc_at_best_val": {t: test.get("auroc" if single else f"{t}.auroc") for t in targets}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="finetune-recipes")
    p.add_argument("--work", default=None, help="working folder (default: OUT/work)")
    p.add_argument("--subjects", type=int, default=128)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--windows", type=int, default=3000, help="training windows per run (sets the epochs)")
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2, help="processes for synth and prepare")
    p.add_argument("--explain", action="store_true", help="explain each run's test participants per target and "
                   "score the group map against the ground-truth voxels of that target")
    args = p.parse_args()
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    report: dict = {"benchmark": "finetune_recipes", "args": vars(args), "timings_s": {}, "runs": {}}
    cohort = work / "cohort"
    if not (cohort / "participants.tsv").is_file():
        report["timings_s"]["synth"] = neurox(
            "synth", str(cohort), "--n_subjects", str(args.subjects), "--n_frames", str(args.frames), "--voxel_size",
            "4", "--workers", str(args.workers), "--quiet", "true", log=log)
    recipes = {name: recipe(name) for name in args.recipes}

    def store_of(name: str) -> Path:  # one store per normalisation, named by the recipe's first part
        return work / f"store-{name.split('_', 1)[0]}"

    for short, name in {n.split("_", 1)[0]: n for n in recipes}.items():  # one recipe per store
        report["timings_s"][f"prepare-{short}"] = neurox(
            "prepare", str(cohort), "--out", str(store_of(name)), "--voxel_size", "4", "--normalization",
            recipes[name]["normalization"], "--workers", str(args.workers), "--quiet", "true", log=log)
    # the default 60% training split, 20-frame windows: enough to turn a window budget into epochs
    train_windows = round(args.subjects * 0.6) * (args.frames // 20)

    lock = threading.Lock()  # runs finish in several threads: one at a time updates and writes the report

    def write() -> None:  # with the lock held
        (out / "finetune_recipes.json").write_text(json.dumps(report, indent=2) + "\n")

    def one(name: str, seed: int) -> None:
        r = recipes[name]
        run = work / f"{name}-s{seed}"
        shutil.rmtree(run, ignore_errors=True)
        epochs = max(1, math.ceil(r.get("windows", args.windows) / train_windows))
        seconds = neurox("finetune", "--store", str(store_of(name)), "--target", r["targets"], "--out",
                         str(run), "--epochs", str(epochs), "--batch_size", str(r["batch_size"]), "--lr", str(r["lr"]),
                         "--weight_decay", str(r["weight_decay"]), "--seed", str(seed), "--n_boot", "100",
                         "--device", args.device, "--loader_workers", "2", log=out / f"log-{name}-s{seed}.txt")
        entry = {"name": name, "recipe": r, "seed": seed, "epochs": epochs, "seconds": seconds,
                 **summary(run, r["targets"].split(","))}
        with lock:
            report["runs"][f"{name}-s{seed}"] = entry
            write()
        if args.explain:
            truth = json.loads((cohort / "ground_truth" / "ground_truth.json").read_text())
            for target in r["targets"].split(","):
                folder = work / f"explain-{name}-s{seed}-{target}"
                shutil.rmtree(folder, ignore_errors=True)
                neurox("explain", str(run), "--store", str(store_of(name)), "--split", "test", "--target",
                       target, "--group_by", target, "--out", str(folder), "--n_steps", "8", "--batch_size", "16",
                       "--device", args.device, "--quiet", "true", log=out / f"log-{name}-s{seed}.txt")
                score = explanation_scores(folder, cohort / "ground_truth" / truth[target]["map"], store_of(name))
                with lock:
                    entry.setdefault("attribution_auroc_vs_ground_truth", {})[target] = score
                    write()
                for png in folder.glob("group-*_attribution.png"):
                    shutil.copy(png, out / f"attribution-{name}-s{seed}-{target}_{png.name}")

    jobs = [(name, seed) for seed in args.seeds for name in args.recipes]
    with ThreadPoolExecutor(args.parallel) as pool:
        for future in [pool.submit(one, *job) for job in jobs]:
            future.result()
    table = {}
    for name in args.recipes:
        rows = [v for v in report["runs"].values() if v["name"] == name]
        table[name] = {target: {
            "test_auroc_mean": float(np.mean([r["test_auroc_at_best_val"][target] for r in rows])),
            "best_val_auroc_mean": float(np.mean([max(x for x in r["val_auroc_per_epoch"][target] if x is not None)
                                                  for r in rows]))}
            for target in recipes[name]["targets"].split(",")}
    report["summary"] = table
    write()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
