"""Does pretraining transfer? Held-out probes and fine-tuning speed on the synthetic cohort, one device.

1. ``neurox synth`` a cohort of --subjects participants; ``neurox prepare`` (``voxel_center``) its first
   half into the pretraining store and its second half into the held-out store.
2. ``neurox pretrain`` (no labels) on the first half, once per --pretrain_seeds.
3. Frozen linear probes (``probe_heldout.py``) of every pretrained backbone and of randomly initialised
   ones (--random) on the held-out half, which no backbone saw; same folds for all (paired).
4. ``neurox finetune`` on --target of the first half (``--finetune_store heldout``: of the second) from
   scratch and from each pretrained model, once per --finetune_seeds (a fine-tuning seed fixes the split,
   head and data order, so each pretrained run is paired with the scratch run of its seed): validation
   score per epoch, and the first step at which each pretrained run reaches its scratch run's best.

Jobs run --parallel at a time on the one device (small models leave a GPU mostly idle), each as
soon as what it needs is done. Prints one JSON document and writes it to OUT/pretrain_transfer.json
after every job, so a run cut short keeps what it measured; each job's output is in OUT/logs/.

    python benchmarks/pretrain_transfer.py --out transfer --subjects 16 --frames 40 --steps 4 \\
        --pretrain_seeds 0 --random 0 --finetune_seeds 0 --finetune_epochs 1 --folds 2 --repeats 1
    python benchmarks/pretrain_transfer.py --out transfer --device cuda --precision bf16 --subjects 256 \\
        --frames 200 --steps 1000 --batch 16 --pretrain_seeds 0 1 --finetune_seeds 0 1 --parallel 6 --workers 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from neurox.train.objectives import compare_models
from neurox.train.runs import predictions_of

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pretrain_probe import val_curve  # noqa: E402
from probe_heldout import compare_to_random  # noqa: E402


def write_manifests(cohort: Path, halves: dict[str, Path]) -> None:
    """participant_id, path, mask of the first and the second half of the cohort's participants. The
    paths are absolute: ``neurox prepare`` reads relative ones from the manifest's folder."""
    runs = sorted(cohort.resolve().glob("sub-*/func/*_desc-preproc_bold.nii.gz"), key=lambda f: f.name)
    half = len(runs) // 2
    for path, chosen in zip(halves.values(), (runs[:half], runs[half:])):
        rows = ["participant_id\tpath\tmask"] + [
            f"{f.parts[-3]}\t{f}\t{str(f).replace('desc-preproc_bold', 'desc-brain_mask')}" for f in chosen]
        path.write_text("\n".join(rows) + "\n")


class Jobs:
    """Command lines with dependencies, run at most ``parallel`` at a time, each as soon as its
    dependencies have succeeded (a job whose dependency failed is skipped, with the reason)."""

    def __init__(self, logs: Path, parallel: int, on_done):
        self.logs, self.parallel, self.on_done = logs, parallel, on_done
        self.pending: list[tuple[str, list[str], list[str]]] = []
        self.status: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def add(self, name: str, command: list[str], after: list[str] | None = None) -> None:
        self.pending.append((name, command, after or []))

    def run(self) -> None:
        running: dict[str, tuple[subprocess.Popen, float, object]] = {}
        while self.pending or running:
            for name, (proc, started, log) in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    log.close()
                    self.seconds[name] = round(time.perf_counter() - started, 1)
                    self.status[name] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
                    print(f"{name}: {self.status[name]} in {self.seconds[name]} s", file=sys.stderr, flush=True)
                    self.on_done(name)
            for job in list(self.pending):
                name, command, after = job
                failed = [a for a in after if self.status.get(a, "ok") != "ok"]
                if failed:
                    self.pending.remove(job)
                    self.status[name] = f"skipped ({', '.join(failed)} did not succeed)"
                elif all(a in self.status for a in after) and len(running) < self.parallel:
                    self.pending.remove(job)
                    log = open(self.logs / f"{name}.txt", "w")
                    log.write("$ " + " ".join(command) + "\n")
                    log.flush()
                    running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT),
                                     time.perf_counter(), log)
            time.sleep(0.5)


def curve(run: Path) -> list[tuple[int, float]]:
    """(step, validation score) at each validation: AUROC for groups, Pearson r for numbers; NaN ones
    (a validation split with one class) left out."""
    for key in ("auroc", "pearson_r"):
        points = [(step, round(float(v), 4)) for step, v in val_curve(run, key) if v is not None and np.isfinite(v)]
        if points:
            return points
    return []


def summarise_finetuning(runs: dict[str, Path]) -> dict:
    """Per run its curve and test score; per pretrained run the first step reaching its scratch run's best."""
    out: dict = {"runs": {}}
    for name, run in runs.items():
        if (run / "metrics.json").is_file():
            test = json.loads((run / "metrics.json").read_text())["test"]
            score = test.get("auroc", test.get("pearson_r"))
            out["runs"][name] = {"val_per_epoch": curve(run),
                                 "test": round(score, 4) if score is not None and np.isfinite(score) else None}
    for name, entry in out["runs"].items():
        seed = name.rsplit("-ft", 1)[1]
        scratch = out["runs"].get(f"scratch-ft{seed}")
        if scratch is None or name.startswith("scratch") or not scratch["val_per_epoch"] or not entry["val_per_epoch"]:
            continue
        best = max(v for _, v in scratch["val_per_epoch"])
        entry["scratch_best_val"] = best
        entry["scratch_first_step_at_best"] = next(s for s, v in scratch["val_per_epoch"] if v >= best)
        entry["first_step_reaching_scratch_best"] = next((s for s, v in entry["val_per_epoch"] if v >= best), None)
        entry["best_val"] = max(v for _, v in entry["val_per_epoch"])
        # the test score less the scratch run's on the same participants, paired (same seed: same split)
        if not all((runs[n] / "predictions.tsv").is_file() for n in (name, f"scratch-ft{seed}")):
            continue
        targets, pretrained = predictions_of(runs[name])
        paired = compare_models(targets, {"test": pretrained}, {"test": predictions_of(runs[f"scratch-ft{seed}"])[1]})
        entry["test_minus_scratch"] = {k: round(v, 4) for k, v in paired.get("test", {}).items()
                                       if k.startswith(("auroc_diff", "pearson_r_diff"))}
    return out


def summarise_probes(files: list[Path]) -> dict:
    """Every backbone's probe scores, and each pretrained one's paired difference to each random one."""
    backbones = {}
    for f in files:
        if f.is_file():
            backbones.update(json.loads(f.read_text())["backbones"])
    compare_to_random(backbones)
    return {"mean": {n: b["mean"] for n, b in backbones.items()},
            "sd_over_repeats": {n: b["sd"] for n, b in backbones.items()},
            **{key: {n: b[key] for n, b in backbones.items() if key in b}
               for key in ("minus_random", "above_every_random")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="pretrain-transfer")
    p.add_argument("--work", default=None, help="working folder for the cohort, stores and runs (default: OUT/work)")
    p.add_argument("--subjects", type=int, default=32, help="first half pretrains and fine-tunes, second half probes")
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--effect_size", type=float, default=1.0)
    p.add_argument("--objective", default="mim")
    p.add_argument("--mask_shape", default="random")
    p.add_argument("--augment", default="true", choices=("true", "false"), help="pretraining augmentations")
    p.add_argument("--decoder_depth", type=int, default=0, help="MIM decoder layers before the voxel map")
    p.add_argument("--steps", type=int, default=20, help="pretraining steps")
    p.add_argument("--batch", type=int, default=8, help="pretraining and fine-tuning batch")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="pretraining (and, without --finetune_lr, fine-tuning) peak learning rate")
    p.add_argument("--pretrain_seeds", type=int, nargs="+", default=[0])
    p.add_argument("--random", type=int, nargs="+", default=[0, 1, 2], help="seeds of random backbones")
    p.add_argument("--targets", default="amplitude_group,coupling_group,order_group,lowfreq_score")
    p.add_argument("--tokens", action="store_true",
                   help="also probe the last stage per position and its lead-lag (probe_heldout.py --tokens)")
    p.add_argument("--tokens_stage", type=int, nargs="*", default=[],
                   help="also probe these stages per position (probe_heldout.py --tokens_stage)")
    p.add_argument("--input", action="store_true",
                   help="also probe the input's own statistics, no backbone (probe_heldout.py --input)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--target", default="coupling_group", help="the fine-tuning target")
    p.add_argument("--finetune_store", default="pretrain", choices=("pretrain", "heldout"),
                   help="fine-tune on the half the backbones pretrained on (unlabelled) or on the half none saw")
    p.add_argument("--finetune_seeds", type=int, nargs="+", default=[0])
    p.add_argument("--finetune_epochs", type=int, default=4)
    p.add_argument("--finetune_split", type=float, nargs=3, default=[0.6, 0.2, 0.2], metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of the fine-tuning store's participants (neurox finetune --split_fractions)")
    p.add_argument("--finetune_lr", type=float, default=None, help="fine-tuning peak learning rate (default: --lr)")
    p.add_argument("--val_every", type=int, default=0,
                   help="fine-tuning: also validate every N steps within an epoch (neurox finetune --val_every)")
    p.add_argument("--head_init", default="random", choices=("random", "probe"),
                   help="fine-tuning head start (neurox finetune --head_init; probe: LP-FT, validated at step 0)")
    p.add_argument("--head_pool", default="mean", choices=("mean", "mean_std", "tokens"),
                   help="what the fine-tuning head reads (neurox finetune --head_pool)")
    p.add_argument("--backbone_lr_scale", type=float, default=1.0,
                   help="fine-tuning from a pretrained model: the backbone's learning rate as a fraction of --lr")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2, help="synth and prepare processes")
    p.add_argument("--loader_workers", type=int, default=2, help="per training job")
    p.add_argument("--parallel", type=int, default=1, help="jobs at once on the device")
    args = p.parse_args()
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    logs = out / "logs"
    for folder in (out, work, logs):
        folder.mkdir(parents=True, exist_ok=True)
    report: dict = {"benchmark": "pretrain_transfer", "args": vars(args)}

    def neurox(*a: str) -> list[str]:
        return [sys.executable, "-m", "neurox.cli", *a]

    def save(_: str = "") -> None:
        for seed in args.pretrain_seeds:  # mean loss of the first and the last 20 steps
            log = work / f"pretrain-{seed}" / "metrics.jsonl"
            losses = [r["loss"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r] \
                if log.is_file() else []
            if losses:
                report.setdefault("pretrain_loss", {})[str(seed)] = {
                    "steps": len(losses), "first": round(float(np.mean(losses[:20])), 4),
                    "last": round(float(np.mean(losses[-20:])), 4)}
        report["probe_heldout"] = summarise_probes(sorted(work.glob("probe-*.json")))
        report["finetune"] = summarise_finetuning(finetune_runs)
        report["jobs"] = {"status": jobs.status, "seconds": jobs.seconds}
        (out / "pretrain_transfer.json").write_text(json.dumps(report, indent=1) + "\n")

    cohort = work / "cohort"
    stores = {"pretrain": work / "store-pretrain", "heldout": work / "store-heldout"}
    finetune_runs: dict[str, Path] = {}
    jobs = Jobs(logs, args.parallel, save)
    jobs.add("synth", neurox("synth", str(cohort), "--n_subjects", str(args.subjects), "--n_frames", str(args.frames),
                             "--voxel_size", "4", "--effect_size", str(args.effect_size), "--seed", "0",
                             "--workers", str(args.workers), "--quiet", "true"))
    started = time.perf_counter()
    jobs.run()  # the manifests name the files synth writes
    if jobs.status["synth"] != "ok":
        sys.exit(f"synth failed: {logs / 'synth.txt'}")
    manifests = {name: work / f"{name}.tsv" for name in stores}
    write_manifests(cohort, manifests)
    for name, store in stores.items():
        jobs.add(f"prepare-{name}", neurox(
            "prepare", str(manifests[name]), "--participants", str(cohort / "participants.tsv"), "--out", str(store),
            "--voxel_size", "4", "--normalization", "voxel_center", "--workers", str(max(1, args.workers // 2)),
            "--quiet", "true"))
    common = ["--precision", args.precision, "--device", args.device, "--loader_workers", str(args.loader_workers),
              "--batch_size", str(args.batch)]
    probe = [sys.executable, str(HERE / "probe_heldout.py"), "--store", str(stores["heldout"]), "--targets",
             args.targets, "--folds", str(args.folds), "--repeats", str(args.repeats), "--device", args.device,
             "--work", str(work / "random"), *(["--tokens"] if args.tokens else []),
             *(["--tokens_stage", *map(str, args.tokens_stage)] if args.tokens_stage else [])]
    for seed in args.pretrain_seeds:
        jobs.add(f"pretrain-{seed}", neurox(
            "pretrain", "--store", str(stores["pretrain"]), "--out", str(work / f"pretrain-{seed}"), "--objective",
            args.objective, "--mask_shape", args.mask_shape, "--augment", args.augment, "--decoder_depth",
            str(args.decoder_depth), "--epochs", "100000", "--max_steps", str(args.steps),
            "--seed", str(seed), "--lr", str(args.lr), *common), after=["prepare-pretrain"])

    def finetune(name: str, seed: int, init: Path | None, after: list[str]) -> None:
        run = finetune_runs[f"{name}-ft{seed}"] = work / f"finetune-{name}-ft{seed}"
        jobs.add(f"finetune-{name}-ft{seed}", neurox(
            "finetune", "--store", str(stores[args.finetune_store]), "--target", args.target, "--out", str(run),
            "--epochs", str(args.finetune_epochs), "--seed", str(seed), "--n_boot", "200", "--head_init",
            args.head_init, "--head_pool", args.head_pool, "--split_fractions",
            "[" + ",".join(map(str, args.finetune_split)) + "]", "--val_every", str(args.val_every), "--lr",
            str(args.lr if args.finetune_lr is None else args.finetune_lr), *common,
            *(["--init", str(init), "--backbone_lr_scale", str(args.backbone_lr_scale)] if init else [])),
            after=after)

    for seed in args.finetune_seeds:  # scratch runs first: they need no pretraining
        finetune("scratch", seed, None, [f"prepare-{args.finetune_store}"])
    jobs.add("probe-random", [*probe, "--random", *map(str, args.random), *(["--input"] if args.input else []),
                              "--out", str(work / "probe-random.json")],
             after=["prepare-heldout"])
    for seed in args.pretrain_seeds:
        model = work / f"pretrain-{seed}" / "model"
        jobs.add(f"probe-{args.objective}-{seed}", [
            *probe, "--random", "--model", f"{args.objective}-{seed}={model}", "--out",
            str(work / f"probe-{args.objective}-{seed}.json")], after=["prepare-heldout", f"pretrain-{seed}"])
        for ft in args.finetune_seeds:
            finetune(f"{args.objective}{seed}", ft, model, [f"pretrain-{seed}", f"prepare-{args.finetune_store}"])
    jobs.run()
    report["seconds"] = round(time.perf_counter() - started, 1)
    save()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
