"""``neurox demo``: synth -> prepare -> finetune + FC baseline -> evaluate -> report, on a CPU.

One multi-target model learns the three binary planted effects at once (amplitude first: it picks
the best validation checkpoint and stratifies the split), and the FC baseline is fitted per target
on the same participants. The report says plainly what a small model trained for minutes finds
and what it does not.

The defaults are what a SwiFT without pretraining needs to find the amplitude effect within
minutes on a CPU (docs/training.md, "What the demo needs"): a ``voxel_center`` store (each voxel's
temporal mean removed: with the published ``global_zscore`` the static anatomy dominates every
window and the model's outputs collapse to a constant), 200 frames per participant (10 windows to
average per participant), batches of 16 windows, and a head that starts as a linear probe of the
randomly initialised backbone's standardised features (LP-FT): those features already hold the
amplitude effect, but a randomly initialised head reads them too slowly for a CPU's budget.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from neurox.io.atomic import write_text_atomic

TARGETS = ("amplitude_group", "coupling_group", "order_group")
WHAT = {
    "amplitude_group": "local: one network fluctuates more",
    "coupling_group": "distributed: two far-apart networks correlate more",
    "order_group": "temporal order only: which network leads",
}


def run_demo(out: str | Path, n_subjects: int = 96, n_frames: int = 200, epochs: int = 3, seed: int = 0,
             normalization: str = "voxel_center", batch_size: int = 16, lr: float = 1e-4, workers: int = 2,
             head_init: str = "probe") -> Path | None:
    """The report's path, or None when a signal stopped the fine-tuning (the same call continues it)."""
    from neurox.analysis.baseline import BaselineConfig, baseline
    from neurox.data.grid import TargetGrid
    from neurox.data.prepare import prepare
    from neurox.data.preprocess import PrepareOptions
    from neurox.data.synthetic import SynthOptions, synthesize
    from neurox.train.engine import checkpoint_exists
    from neurox.train.finetune import FinetuneConfig, finetune

    out = Path(out)
    timings = {}

    def step(name, fn):
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - started, 1)
        return result

    cohort = step("synth", lambda: synthesize(out / "cohort", SynthOptions(
        n_subjects=n_subjects, n_frames=n_frames, voxel_size_mm=4.0, seed=seed), workers=workers))
    store = out / "store"
    options = PrepareOptions(grid=TargetGrid.default(4.0), normalization=normalization)
    report = step("prepare", lambda: prepare(cohort, store, options, workers=workers))
    if not report.ok:
        raise RuntimeError(f"prepare failed for {len(report.failed)} runs; see {store / 'failures.tsv'}")
    run = out / "runs" / "swift"
    if not (run / "metrics.json").is_file():
        resume = checkpoint_exists(run)
        step("finetune", lambda: finetune(FinetuneConfig(
            store=str(store), target=",".join(TARGETS), out=str(run), preset="demo", epochs=epochs,
            batch_size=batch_size, lr=lr, seed=seed, loader_workers=2, head_init=head_init, resume=resume)))
        if not (run / "metrics.json").is_file():  # stopped by Ctrl-C or SIGTERM, after a checkpoint
            print(f"demo stopped during finetune; run the same command again to continue from {run}", flush=True)
            return None
    atlas = next((cohort / "ground_truth").glob("atlas-synthetic_space-*_dseg.nii.gz"))
    fc = out / "runs" / "fc_baseline"
    step("baseline", lambda: baseline(BaselineConfig(
        store=str(store), target=",".join(TARGETS), out=str(fc), atlas=str(atlas), split_from=str(run), seed=seed),
        progress=False))
    model_metrics = json.loads((run / "metrics.json").read_text())
    fc_metrics = json.loads((fc / "metrics.json").read_text())
    curve = training_curve(run, out / "training_curve.png")
    return write_report(out, model_metrics, fc_metrics, curve, timings, n_subjects, n_frames, normalization,
                        head_init, paired_cells(run, fc))


def paired_cells(run: Path, fc: Path) -> dict[str, str]:
    """Per target, the model's test AUROC less the baseline's on the same participants, with the paired bootstrap
    interval and p-value (``neurox.train.objectives.compare_models``), from both runs' predictions.tsv."""
    from neurox.train.objectives import compare_models
    from neurox.train.runs import predictions_of

    targets, model = predictions_of(run)
    paired = compare_models(targets, {"test": model}, {"test": predictions_of(fc)[1]}).get("test", {})
    cells = {}
    for target in TARGETS:
        d, low, high, p = (paired.get(f"{target}.auroc_diff{k}", np.nan) for k in ("", "_ci_low", "_ci_high", "_p"))
        cells[target] = f"{d:+.2f} [{low:+.2f}, {high:+.2f}], p {p:.2g}" if np.isfinite(low) else "n/a"
    return cells


def training_curve(run: Path, png: Path) -> Path | None:
    """Training loss per step and validation AUROC (amplitude) per epoch."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    val = [(r["step"], r["val"].get(f"{TARGETS[0]}.auroc")) for r in records if "val" in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, losses, lw=0.8, color="tab:blue", label="training loss (sum of 3 targets)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    twin = ax.twinx()
    twin.plot([s for s, _ in val], [v for _, v in val], "o-", color="tab:red", label="validation AUROC (amplitude)")
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("AUROC")
    fig.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _cell(metrics: dict, target: str, name: str) -> str:
    value = metrics.get(f"{target}.{name}")
    if value is None:
        return "n/a"
    low, high = metrics.get(f"{target}.{name}_ci_low"), metrics.get(f"{target}.{name}_ci_high")
    p = metrics.get(f"{target}.{name}_p")
    return f"{value:.2f} [{low:.2f}, {high:.2f}]" + (f", p {p:.2g}" if p is not None else "")


def write_report(out: Path, model: dict, fc: dict, curve: Path | None, timings: dict, n_subjects: int,
                 n_frames: int, normalization: str = "voxel_center", head_init: str = "probe",
                 paired: dict[str, str] | None = None) -> Path:
    test_model, test_fc, val_model = model.get("test", {}), fc.get("test", {}), model.get("val", {})
    lines = [
        "# neurox demo report",
        "",
        f"Synthetic cohort: {n_subjects} participants, one run of {n_frames} frames each (TR 0.8 s, 4 mm MNI grid), "
        f"split by participant 60/20/20 (test: {test_model.get('n_subjects')} participants); store normalisation "
        f"`{normalization}`.",
        "Model: SwiFT `demo` preset, randomly initialised (no pretraining), fine-tuned on the three binary targets "
        "at once" + (", its head started as a linear probe of the random backbone's standardised pooled features "
                     "(LP-FT, `--head_init probe`)" if head_init == "probe" else "") +
        "; test metrics from the best validation checkpoint. Baseline: Fisher-z FC of the synthetic parcels + "
        "logistic regression, fitted on the same training participants. 95% CI: bootstrap over the test "
        "participants; p: the share of permutations of their labels (against the fixed outputs) that score as well. "
        "Model - FC baseline: the difference of the two AUROCs on the same test participants, with the interval "
        "and two-sided p-value of one bootstrap that scores both on every resample.",
        "",
        "| target (test, subject level) | what is planted | model AUROC [95% CI], p | model validation AUROC "
        "| FC baseline AUROC [95% CI], p | model - FC baseline [95% CI], p | model output ~ head motion (r) |",
        "|---|---|---|---|---|---|---|",
    ]
    for target in TARGETS:
        motion, val = test_model.get(f"{target}.mean_fd_r"), val_model.get(f"{target}.auroc")
        lines.append(f"| {target} | {WHAT[target]} | {_cell(test_model, target, 'auroc')} | "
                     f"{'n/a' if val is None else f'{val:.2f}'} | {_cell(test_fc, target, 'auroc')} | "
                     f"{(paired or {}).get(target, 'n/a')} | {'n/a' if motion is None else f'{motion:.2f}'} |")
    amplitude = test_model.get(f"{TARGETS[0]}.auroc", float("nan"))
    lines += [
        "",
        f"The model {'finds' if amplitude >= 0.8 else 'does not yet find'} the local amplitude effect "
        f"(test AUROC {amplitude:.2f}). A small model without pretraining, trained for minutes on a few dozen "
        "participants, is not expected to find the coupling or the temporal-order effect, which the FC baseline's "
        "correlation matrices see at once for coupling (and, having no notion of lag, cannot see for temporal "
        "order). Trained about eight times longer (on a GPU, 128 participants), the same model does find coupling "
        "(docs/training.md); self-supervised pretraining on many scans is where that gap is attacked. Where the "
        "validation AUROC is near 0.5 the model has not learned the target, and its test AUROC on 20 participants "
        "can land anywhere, below 0.5 too: that is what it memorised of the training participants running the "
        "other way on these, not a signal.",
        "",
        "The last column is the motion check: the correlation of the model's test outputs with each participant's "
        "mean framewise displacement (from the cohort's confounds). The synthetic head motion is drawn apart from "
        "the planted groups, so only chance puts it far from 0 here; on real cohorts, where motion goes with age and "
        "diagnosis, an output that follows motion more than the target does needs checking (docs/training.md).",
        "",
        "Time per step (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
        "",
        "Outputs:",
        f"- cohort and ground truth: `{out / 'cohort'}`",
        f"- store: `{out / 'store'}`",
        f"- model run (metrics.json, predictions.tsv, model/): `{out / 'runs' / 'swift'}`",
        f"- FC baseline run: `{out / 'runs' / 'fc_baseline'}`",
    ]
    if curve is not None:
        lines.append(f"- training curve: `{curve}`")
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
