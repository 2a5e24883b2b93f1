"""The Python face of the ``neurox`` command: one function per command, taking the command's options
as keyword arguments of the same names and defaults (``neurox prepare IN --out S --voxel_size 4`` is
``neurox.prepare(IN, out=S, voxel_size=4)``). The command line calls these functions, so the two
cannot drift apart; a test checks that every default agrees with the command's.

Each returns what the command writes (a path, a report) or reports (metrics), instead of printing it.
Imports are local so that ``import neurox`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def synth(out: str | Path, n_subjects: int = 40, n_runs: int = 1, n_frames: int = 120, tr: float = 0.8,
          voxel_size: float = 2.0, effect_size: float = 1.0, noise: float = 1.0, motion_spikes: bool = True,
          motion_effect: float = 0.0, n_parcels: int = 40, seed: int = 0, non_steady_frames: int = 0, workers: int = 1,
          quiet: bool = False) -> Path:
    """Write a synthetic cohort with planted effects and their ground truth; returns its folder."""
    from neurox.data.synthetic import SynthOptions, synthesize

    options = SynthOptions(n_subjects=n_subjects, n_runs=n_runs, n_frames=n_frames, tr=tr, voxel_size_mm=voxel_size,
                           effect_size=effect_size, noise=noise, motion_spikes=motion_spikes,
                           motion_effect=motion_effect, n_parcels=n_parcels, seed=seed,
                           non_steady_frames=non_steady_frames)
    return synthesize(out, options, progress=not quiet, workers=workers)


def prepare(input: str | Path, out: str | Path, participants: str | Path | None = None,
            like: str | Path | None = None, voxel_size: float = 2.0, grid: list[int] | None = None,
            normalization: str = "global_zscore", resample: bool = False, min_frames: int = 20,
            tr: float | None = None, workers: int = 1, shard: str = "0/1", format: str = "zarr",
            confounds: str = "none", global_signal: bool = False, task: str | None = None, space: str | None = None,
            hcp_bold: str = "minimal", id_column: str | None = None, session_column: str | None = None,
            max_mean_fd: float | None = None, resample_tr: float | None = None,
            non_steady_state: str | None = None, desc: str | None = None, dry_run: bool = False,
            quiet: bool = False):
    """Preprocess fMRI runs into a store; returns the report (``.done``, ``.skipped``, ``.failed``,
    ``.ok``, ``.store``). A bad run is listed in ``failures.tsv`` and the rest go on. With ``dry_run``,
    nothing is written and ``.survey`` says what would be done and what would fail."""
    from neurox.data.grid import TargetGrid
    from neurox.data.prepare import options_from_model, parse_shard
    from neurox.data.prepare import prepare as prepare_store
    from neurox.data.preprocess import PrepareOptions
    from neurox.hub import read_config

    model_space = None
    if like:
        options = options_from_model(like, resample=resample or None, tr=tr, resample_tr=resample_tr,
                                     non_steady_state=non_steady_state, bold_desc=desc)
        model_space = read_config(like)["input_contract"].get("space")
    else:
        options = PrepareOptions(grid=TargetGrid.default(voxel_size, grid), normalization=normalization,
                                 resample=resample, min_frames=min_frames, tr=tr, confounds=confounds,
                                 global_signal=global_signal, resample_tr=resample_tr,
                                 non_steady_state=non_steady_state, bold_desc=desc or "preproc")
    return prepare_store(input, out, options, participants=participants, workers=workers, shard=parse_shard(shard),
                         fmt=format, progress=not quiet, task=task, hcp_bold=hcp_bold, id_column=id_column,
                         session_column=session_column, max_mean_fd=max_mean_fd, dry_run=dry_run, space=space,
                         model_space=model_space)


def finetune(**options: Any) -> Path:
    """Train on a store's phenotypes (the options of ``neurox finetune``, e.g. ``store=``, ``target=``,
    ``out=``, ``init=``); returns the run directory."""
    from neurox.train.finetune import FinetuneConfig
    from neurox.train.finetune import finetune as run

    return run(FinetuneConfig(**_tuples(options)))


def pretrain(**options: Any) -> Path:
    """Self-supervised pretraining (the options of ``neurox pretrain``; ``store=`` a list of stores);
    returns the run directory, whose ``model/`` ``finetune(init=...)`` takes."""
    from neurox.train.pretrain import PretrainConfig
    from neurox.train.pretrain import pretrain as run

    if isinstance(options.get("store"), (str, Path)):  # one store
        options["store"] = [str(options["store"])]
    return run(PretrainConfig(**_tuples(options)))


def evaluate(run: str | Path, store: str | Path, baseline: str | Path | None = None,
             compare: str | Path | None = None, batch_size: int = 4, out: str | Path | None = None,
             quiet: bool = False) -> dict:
    """Subject-level metrics with 95% intervals per split: ``{"model": {split: metrics}}``. With a baseline run of
    the same targets, ``"fc_baseline"`` beside it and ``"model_minus_fc_baseline"``: each metric's paired
    difference on the same participants, with its interval and p-value. With ``compare``, another fine-tuning run
    of the same targets (from scratch beside a pretrained one, say), ``"compared"`` and ``"model_minus_compared"``
    likewise. Written as JSON to ``out`` when given."""
    from neurox.train.distributed import detect, process_group
    from neurox.train.runs import evaluate as evaluate_run
    from neurox.train.runs import run_targets

    targets = run_targets(run)
    described = [(t.column, t.task, t.classes) for t in targets]
    if compare and [(t.column, t.task, t.classes) for t in run_targets(compare)] != described:
        raise ValueError(f"--compare {compare}: its targets differ from {run}'s, so their metrics do not compare")
    model, other = {}, {}  # each participant's outputs, for the paired differences
    with process_group(detect("auto")) as env:  # under a launcher, the processes share the windows of both runs
        scored = {"model": evaluate_run(run, store, batch_size, progress=not quiet, out=out, keep=model)}
        if compare:  # its outputs are kept apart from the model's, so that both resume
            kept = f"{out}.compared" if out else None
            scored["compared"] = evaluate_run(compare, store, batch_size, progress=not quiet, out=kept, keep=other)
        first = env.is_main
    if not first:  # what follows needs no other process: the first alone scores the baseline and writes
        return scored
    return _compared(targets, described, scored, model, other, store, baseline, compare, out, quiet)


def _compared(targets, described: list[tuple], scored: dict, model: dict, other: dict, store, baseline, compare,
              out, quiet) -> dict:
    """The results of ``evaluate`` from the runs' metrics and outputs (``described``: each target's column, task
    and classes): the baseline scored beside them, each paired difference, the file written."""
    import json

    from neurox.io.atomic import write_text_atomic
    from neurox.io.claim import discard_parts
    from neurox.train.objectives import compare_models

    results = {"model": scored["model"]}
    if baseline:
        from neurox.analysis.baseline import evaluate_baseline

        fc = {}
        results["fc_baseline"] = evaluate_baseline(baseline, store, progress=not quiet, keep=fc)
        baseline_targets = json.loads((Path(baseline) / "targets.json").read_text())["targets"]
        if [(t["column"], t["task"], t["classes"]) for t in baseline_targets] == described:
            # the model less the baseline on the same participants: a paired interval and p-value
            results["model_minus_fc_baseline"] = compare_models(targets, model, fc)
            _say_overlap(f"--baseline {baseline}", "model_minus_fc_baseline", model, fc)
    if compare:
        results["compared"] = scored["compared"]
        results["model_minus_compared"] = compare_models(targets, model, other)
        _say_overlap(f"--compare {compare}", "model_minus_compared", model, other)
    if out:
        write_text_atomic(out, json.dumps(results, indent=2) + "\n")
        discard_parts(out)  # the outputs it kept to resume
        discard_parts(f"{out}.compared")
    return results


def _say_overlap(option: str, key: str, model: dict, other: dict) -> None:
    """A line per split where the other model was scored on only some of the model's participants: their paired
    difference is over those alone (the runs were split otherwise)."""
    import sys

    from neurox.train.objectives import split_overlap

    for split, (shared, n) in split_overlap(model, other).items():
        print(f"warning: {option} scored {shared} of this run's {n} {split} participants as {split} participants (it "
              f"was split otherwise, or left some out); {key}.{split} is over those {shared}"
              + (", too few: left out" if shared < 3 else ""), file=sys.stderr)


def predict(run: str | Path, store: str | Path, out: str | Path, batch_size: int = 4, quiet: bool = False) -> Path:
    """One row per participant of the store (output and prediction per target) written to ``out``."""
    from neurox.train.distributed import detect, process_group
    from neurox.train.runs import predict as predict_run

    with process_group(detect("auto")):  # under a launcher, the processes share the windows; the first writes
        return predict_run(run, store, out, batch_size, progress=not quiet)


def baseline(quiet: bool = False, **options: Any) -> Path:
    """The FC + linear baseline (the options of ``neurox baseline``); returns its run directory."""
    from neurox.analysis.baseline import BaselineConfig
    from neurox.analysis.baseline import baseline as run

    return run(BaselineConfig(**options), progress=not quiet)


def connectivity(store: str | Path, atlas: str | Path, out: str | Path, kind: str = "fisher_z",
                 confounds: str = "none", fd_threshold: float = 0.5, global_signal: bool = False,
                 names: str | Path | None = None, participants: list[str] | None = None,
                 group_by: str | None = None, covariates: list[str] | None = None, workers: int = 1,
                 harmonize: str | None = None, nbs: float | None = None, permutations: int = 1000, seed: int = 0,
                 quiet: bool = False) -> Path:
    """Parcel series (denoised by the ``confounds`` strategy) and a connectivity matrix per participant,
    written to the folder ``out``; with ``group_by``, edgewise statistics (``edges.tsv``, ``edges.json``)
    adjusted for ``covariates``, of edges harmonised across the ``harmonize`` column's sites by ComBat (the
    group and covariates preserved), and with ``nbs`` (a t threshold) the network-based statistic's components
    (``nbs.tsv``) from ``permutations`` permutations drawn with ``seed``. ``workers``: processes reading the runs."""
    from neurox.analysis.connectivity import connectivity as run
    from neurox.analysis.nbs import NBSOptions
    from neurox.data.confounds import Denoising

    return run(store, atlas, out, kind=kind, participants=participants, group_by=group_by, names_tsv=names,
               progress=not quiet, denoising=Denoising(confounds, fd_threshold, global_signal),
               covariates=covariates, workers=workers, harmonize=harmonize,
               nbs=NBSOptions(nbs, permutations, seed) if nbs is not None else None)


def explain(run: str | Path, store: str | Path, out: str | Path, subject: list[str] | None = None,
            split: str | None = None, where: str | None = None, group_by: str | None = None, quantiles: int = 4,
            target: str | None = None, class_value: str | None = None, n_steps: int = 16, noise_samples: int = 0,
            noise_std: float = 0.1, baseline: str = "zero", reduce: str = "abs", smooth_fwhm: float = 6.0,
            batch_size: int = 2, device: str = "auto", atlas: str | Path | None = None,
            names: str | Path | None = None, quiet: bool = False) -> Path:
    """Attribution maps (NIfTI and PNG) of a trained run for participants and groups, in ``out``; with an
    atlas, the regions that drove the output (``regions.tsv``)."""
    from neurox.analysis.explain import ExplainOptions
    from neurox.analysis.explain import explain as run_explain

    options = ExplainOptions(target=target, class_value=class_value, n_steps=n_steps, noise_samples=noise_samples,
                             noise_std=noise_std, baseline=baseline, reduce=reduce, batch_size=batch_size,
                             smooth_fwhm=smooth_fwhm)
    return run_explain(run, store, out, options, subjects=subject, split=split, where=where, group_by=group_by,
                       quantiles=quantiles, device=device, progress=not quiet, atlas=atlas, names=names)


def embed(model: str | Path, store: str | Path, out: str | Path, color_by: str | None = None, batch_size: int = 4,
          device: str = "auto", quiet: bool = False) -> dict[str, Path]:
    """Participant and window embeddings and a PCA plot; returns their paths."""
    from neurox.analysis.embed import embed as run

    return run(model, store, out, color_by=color_by, batch_size=batch_size, device=device, progress=not quiet)


def probe(model: str | Path, store: str | Path, target: str, out: str | Path | None = None,
          split_from: str | Path | None = None, seed: int = 0, pool: str = "mean", stage: int | None = None,
          batch_size: int = 4, device: str = "auto", split_by: str | None = None, covariates: list[str] | None = None,
          where: str | None = None, folds: int | None = None, harmonize: str | None = None,
          quiet: bool = False) -> dict:
    """A closed-form linear probe of a frozen model: metrics per split (with ``folds``, cross-validated)."""
    from neurox.analysis.probe import probe as run

    return run(model, store, target, out=out, split_from=split_from, seed=seed, pool=pool, batch_size=batch_size,
               device=device, stage=stage, progress=not quiet, split_by=split_by, covariates=covariates,
               where=where, folds=folds, harmonize=harmonize)


def demo(out: str | Path = "neurox-demo", n_subjects: int = 96, n_frames: int = 200, epochs: int = 3, seed: int = 0,
         normalization: str = "voxel_center", batch_size: int = 16, lr: float = 1e-4, workers: int = 2,
         head_init: str = "probe") -> Path | None:
    """synth -> prepare -> finetune + FC baseline -> evaluate on a synthetic cohort; returns the report (None
    when Ctrl-C or SIGTERM stopped the fine-tuning: the same call continues it)."""
    from neurox.demo import run_demo

    return run_demo(out, n_subjects=n_subjects, n_frames=n_frames, epochs=epochs, seed=seed,
                    normalization=normalization, batch_size=batch_size, lr=lr, workers=workers, head_init=head_init)


def convert_swift(checkpoint: str | Path, out_dir: str | Path, task: str | None = None, **architecture: Any) -> Path:
    """A published SwiFT checkpoint as a model directory; ``architecture`` sets or overrides
    hyper-parameters the checkpoint lacks (``img_size=[96, 96, 96, 20]``, ``depths=[2, 2, 6, 2]``, ...)."""
    from neurox.models.convert import HPARAM_FIELDS
    from neurox.models.convert import convert_swift as convert

    unknown = sorted(set(architecture) - set(HPARAM_FIELDS.values()))
    if unknown:
        raise ValueError(f"unknown architecture setting(s) {', '.join(unknown)}; "
                         f"choose among {', '.join(HPARAM_FIELDS.values())}")
    return convert(checkpoint, out_dir, overrides={k: v for k, v in architecture.items() if v is not None},
                   task=task)


COMMANDS = {"synth": synth, "prepare": prepare, "finetune": finetune, "pretrain": pretrain, "evaluate": evaluate,
            "predict": predict, "baseline": baseline, "connectivity": connectivity, "explain": explain,
            "embed": embed, "probe": probe, "demo": demo, "convert-swift": convert_swift}


def _tuples(options: dict) -> dict:
    # YAML and the command line give sequences back as lists; the configs hold tuples
    return {k: tuple(v) if isinstance(v, list) and k == "split_fractions" else v for k, v in options.items()}
