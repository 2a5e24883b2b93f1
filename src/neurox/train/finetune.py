"""``neurox finetune``: a model trained on a store's phenotypes, evaluated honestly (participant
splits, subject-level metrics with bootstrap intervals, test metrics from the best validation
checkpoint). ``neurox evaluate`` and ``predict`` read a finished run back: ``neurox.train.runs``.

A run directory holds ``config.yaml`` (every resolved option), ``splits.tsv``, ``targets.json``,
``metrics.jsonl`` (training log), ``checkpoints/last/`` (a sharded checkpoint), ``model/`` (the best validation model, a
model directory), ``metrics.json`` and ``predictions.tsv``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from neurox.config import InputContract, SwiFTConfig, preset
from neurox.data.confounds import participant_motion
from neurox.data.loader import (
    Cohort,
    Target,
    ThreadedLoader,
    WindowDataset,
    as_model_input,
    evaluation_items,
    load_cohort,
    load_splits,
    save_splits,
    split_participants,
    standardise,
    training_items,
)
from neurox.data.store import Store
from neurox.io.atomic import write_text_atomic
from neurox.models import SwiFT, build_head
from neurox.models.heads import HEAD_POOLS
from neurox.train import distributed as dist_utils
from neurox.train.engine import (
    PRECISIONS,
    LoopSettings,
    Trainer,
    run_environment,
    sharded_indices,
    start_run,
    write_json,
)
from neurox.train.objectives import (
    decision_thresholds,
    head_task,
    num_outputs,
    selection_score,
    subject_metrics,
    supervised_loss,
)
from neurox.train.runs import (
    add_gaps,
    check_contract,
    check_fits_store,
    check_trs,
    first_rows,
    prediction_rows,
    read_targets,
    split_metrics,
    store_contract,
    store_tr,
    window_outputs,
    write_predictions,
)


@dataclass
class FinetuneConfig:
    """Every option of a fine-tuning run (the YAML given to ``--config`` uses these names)."""

    store: str = ""  # the store (from neurox prepare) to train on
    target: str = ""  # a phenotype column, or several separated by commas
    out: str = ""  # the run directory to write (or, with --resume, to continue)
    task: str | None = None  # per target, comma-separated: binary, multiclass, regression (default: inferred)
    preset: str = "demo"  # architecture when there is no --init: demo (small, 4 mm) or swift_paper
    init: str | None = None  # a model directory: its architecture and backbone weights
    freeze: bool = False  # train the head only (a linear probe)
    head_init: str = "random"  # random, or probe: fit the head in closed form first (LP-FT)
    head_pool: str = "mean"  # what the head reads: mean (published), mean_std, or tokens (per position)
    backbone_lr_scale: float = 1.0  # the backbone's learning rate as a fraction of lr's (the head keeps lr)
    epochs: int = 10  # passes over the training participants' windows
    batch_size: int = 4  # windows per process and step
    accumulation: int = 1  # steps whose gradients add up before one update (a larger batch without memory)
    lr: float = 1e-4  # peak learning rate (from scratch on small cohorts, 5e-4 and above collapsed after warm-up)
    weight_decay: float = 0.05  # AdamW's decoupled weight decay
    warmup_fraction: float = 0.1  # of the steps, with the learning rate rising linearly; then cosine decay
    clip_grad: float = 1.0  # largest gradient norm (0: no clipping)
    precision: str = "fp32"  # fp32, bf16, fp16
    strategy: str = "ddp"  # ddp or fsdp, with several processes
    loader_workers: int = 2  # threads reading windows per process
    grad_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower steps
    seed: int = 0  # fixes the split, the head's start and the order of the data
    deterministic: bool = False  # deterministic kernels where torch has them (slower), for runs that repeat exactly
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, validation, test participants
    split_by: str | None = None  # a phenotype column (family ID, site) whose members share one side of the split
    folds: int | None = None  # k-fold cross-validation: a run per fold in OUT/fold1 ..., pooled test metrics in OUT
    where: str | None = None  # COLUMN=VALUE: only these participants (controls, for a normative model)
    checkpoint_every: int = 0  # steps; 0: at epoch ends (and on SIGTERM)
    max_steps: int | None = None  # stop after this many steps (the learning-rate schedule ends there)
    val_every: int = 0  # steps between validations besides each epoch's end (long epochs); 0: epoch ends only
    resume: bool = False  # continue the run in --out from its last checkpoint
    device: str = "auto"  # auto (the accelerator if any), cpu, cuda, xpu ...
    n_boot: int = 1000  # bootstrap resamples of the participants for the 95% intervals

    @property
    def targets(self) -> list[str]:
        return [t.strip() for t in self.target.split(",") if t.strip()]

    @property
    def tasks(self) -> list[str | None] | None:
        if not self.task:
            return None
        tasks = [t.strip() or None for t in self.task.split(",")]
        if len(tasks) != len(self.targets):
            raise ValueError(f"--task gives {len(tasks)} task(s) for {len(self.targets)} target(s)")
        return tasks

    def settings(self) -> LoopSettings:
        return LoopSettings(self.epochs, self.batch_size, self.accumulation, self.lr, self.weight_decay,
                            self.warmup_fraction, self.clip_grad, self.precision, self.loader_workers, self.seed,
                            self.checkpoint_every, self.max_steps, self.backbone_lr_scale, self.val_every)


# --- setting up --------------------------------------------------------------------------------


def architecture(config: FinetuneConfig) -> SwiFTConfig:
    if config.init:
        from neurox.hub import read_config

        return SwiFTConfig.from_dict(read_config(config.init)["model"])
    return preset(config.preset)


def build_model(config: FinetuneConfig, arch: SwiFTConfig, targets: list[Target]) -> SwiFT:
    # a linear probe (--freeze) and fine-tuning from one (--head_init probe) standardise the pooled
    # features with their training statistics: a random SwiFT's features differ between participants
    # by a few percent of their size, which an unstandardised head reads only with huge weights
    x, y, z, _ = arch.stage_grid(arch.num_stages - 1)
    head = build_head(head_task(targets), arch.num_features, num_outputs(targets),
                      standardize=config.freeze or config.head_init == "probe", pool=config.head_pool,
                      positions=x * y * z)
    head.batch_statistics = config.head_init == "probe" and not config.freeze
    model = SwiFT(arch, head)
    if config.init:
        from neurox.hub import load_pretrained

        model.load_state_dict(load_pretrained(config.init, with_head=False).state_dict(), strict=False)
    if config.freeze:
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("head.")
    model.set_grad_checkpointing(config.grad_checkpointing)
    return model


def prepare_cohort(config: FinetuneConfig, store: Store, run_dir: Path, length: int, say: bool = True) -> Cohort:
    cohort = load_cohort(store, config.targets, config.tasks, config.split_by, config.where)
    splits_file = run_dir / "splits.tsv"
    if splits_file.is_file():
        cohort.split = load_splits(splits_file)
    else:
        cohort.split = split_participants(cohort, config.seed, config.split_fractions, say)
    standardise(cohort)
    if config.resume and (run_dir / "targets.json").is_file():  # what the saved model's head was recentred by
        for t, saved in zip(cohort.targets, read_targets(run_dir)):
            t.threshold = saved.threshold if saved.column == t.column else None
    for name in ("train", "val"):
        if not cohort.in_split(name):
            raise ValueError(f"no participants in the {name} split; need more participants with {config.target}")
    too_short = [r for r, n in cohort.n_frames.items() if n < length]
    if len(too_short) == len(cohort.n_frames):
        raise ValueError(f"every run is shorter than the model's window of {length} frames")
    return cohort


# --- commands ----------------------------------------------------------------------------------


def finetune(config: FinetuneConfig) -> Path:
    if config.folds:
        from neurox.train.folds import finetune_folds

        return dist_utils.launch(finetune_folds, config)
    return dist_utils.launch(_finetune, config)


def _finetune(config: FinetuneConfig, env: dist_utils.Env) -> Path:
    if not config.store or not config.target or not config.out:
        raise ValueError("finetune needs --store, --target and --out")
    if config.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {config.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if config.head_init not in ("random", "probe"):
        raise ValueError(f"unknown --head_init {config.head_init!r}; choose random or probe")
    if config.head_pool not in HEAD_POOLS:
        raise ValueError(f"unknown --head_pool {config.head_pool!r}; choose one of {', '.join(HEAD_POOLS)}")
    config.settings()  # the loop's counts and rates, refused by name where out of range
    if config.freeze and config.backbone_lr_scale != 1.0:
        raise ValueError("--backbone_lr_scale has no effect with --freeze true (the backbone does not train)")
    run_dir = Path(config.out)
    start_run(run_dir, "finetune", config.resume, config.seed, config.deterministic)

    store = Store(config.store)
    arch = architecture(config)
    check_fits_store(arch, store)  # all of these fail before any training starts
    check_trs([store], env.is_main)
    if config.init:
        from neurox.hub import read_config

        check_contract(read_config(config.init)["input_contract"], store, config.init, env.is_main)
    length, grid = arch.img_size[3], arch.img_size[:3]
    cohort = prepare_cohort(config, store, run_dir, length, say=env.is_main)
    targets = cohort.targets

    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not config.resume:  # a fresh run's log starts empty (an earlier attempt may have failed early)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        resolved = {**dataclasses.asdict(config), "model": arch.to_dict(), "world_size": env.world_size,
                    "device": str(env.device), "environment": run_environment(env, [store])}
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        save_splits(run_dir / "splits.tsv", cohort.split)
        write_json(run_dir / "targets.json", {"targets": [t.to_dict() for t in targets],
                                              "participants_left_out": cohort.left_out})
        cohort.say_left_out("finetune")
        cohort.say_targets("finetune")
    dist_utils.barrier()

    model = build_model(config, arch, targets).to(env.device)
    if model.head.standardize and not config.resume:
        # the probe that starts the head reads every window of every training participant, as `neurox
        # probe` does: a mean over a few random windows holds too little of a slow effect (docs/training.md)
        pooled, labels, who = training_features(model, store.root, cohort, length, grid, env, config,
                                                every_window=config.head_init == "probe")
        model.head.calibrate(pooled.to(env.device))
        if config.head_init == "probe":
            initialise_head(model, targets, pooled, labels, who, config.seed)
    wrapped = dist_utils.wrap(model, env, config.strategy)
    contract = InputContract.for_model(arch, tr=store_tr(store), **store_contract(store.info))
    motion = participant_motion(store)  # for the motion check of every validation

    chosen = {"thresholds": np.zeros(num_outputs(targets))}  # of the latest validation, for save_best

    def evaluate():
        if model.head.batch_statistics and trainer.step > 0:  # the backbone moved: its statistics, recomputed
            pooled, _, _ = training_features(wrapped, store.root, cohort, length, grid, env, config, max_windows=128)
            model.head.calibrate(pooled.to(env.device))
        who, outputs = window_outputs(wrapped, store.root, cohort, cohort.in_split("val"), length, grid, env,
                                      config.batch_size, config.precision)
        labels = {p: cohort.labels(p) for p in set(who)}
        # the class decision, recentred on these participants; the model saved as best carries it in its head
        chosen["thresholds"] = decision_thresholds(targets, who, outputs, labels)
        metrics = subject_metrics(targets, who, outputs - chosen["thresholds"], labels, config.n_boot, motion)[0]
        return selection_score(targets, metrics), metrics

    def save_best(step: int, metrics: dict):
        state = _full_model_state(wrapped)  # a collective under FSDP: every process calls it
        if env.is_main:
            best = SwiFT(arch, build_head(model.head.task, arch.num_features, model.head.head.out_features,
                                          standardize=model.head.standardize, pool=model.head.pool,
                                          positions=model.head.positions))
            best.load_state_dict(state)
            recentred = recentre_head(best, targets, chosen["thresholds"])
            from neurox.hub import save_pretrained

            save_pretrained(best, run_dir / "model", contract=contract,
                            card=_card(config, targets, step, metrics, recentred),
                            source={"run": str(run_dir), "step": step})
            # targets.json says what the saved model's head was recentred by (the outputs written carry it)
            write_json(run_dir / "targets.json", {"targets": [t.to_dict() for t in targets],
                                                  "participants_left_out": cohort.left_out})

    def loss_fn(model, x, labels):
        return supervised_loss(model(as_model_input(x, env.device)), labels, targets)

    trainer = Trainer(wrapped, loss_fn, config.settings(), env, run_dir,
                      lambda epoch: training_items(cohort, length, config.seed, epoch),
                      lambda items: WindowDataset(store.root, cohort, items, length, grid), evaluate)
    if config.resume and trainer.load_checkpoint() and env.is_main:
        print(f"resumed {run_dir} at step {trainer.step} of {trainer.total_steps}")
    if config.head_init == "probe" and trainer.step == 0:
        # step 0: the linear probe alone, before any fine-tuning step; kept as model/ if no epoch beats it
        trainer.validate(on_best=save_best)
    outcome = trainer.fit(on_best=save_best)
    if outcome == "stopped":
        if env.is_main:
            print(f"stopped by {trainer.stopped_by} at step {trainer.step}; continue with --resume true")
        return run_dir
    dist_utils.barrier()
    final_evaluation(run_dir, store, cohort, targets, length, grid, env, config, motion)
    return run_dir


@torch.no_grad()
def training_features(model, store_root: Path, cohort: Cohort, length: int, grid, env, config,
                      max_windows: int = 512, every_window: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Pooled backbone features, labels and participant ids of (up to ``max_windows``) random training
    windows, or with ``every_window`` of every non-overlapping window of every training participant,
    from every process's share. ``model`` may be wrapped for several processes: the features are read
    at the input of its head during a full forward pass, so sharded parameters are gathered as usual."""
    if every_window:
        items = evaluation_items(cohort, cohort.in_split("train"), length)
        if env.is_main:
            print(f"linear probe of the head: features of {len(items)} windows of "
                  f"{len(cohort.in_split('train'))} training participants", flush=True)
    else:
        items = training_items(cohort, length, config.seed, epoch=0)[:max_windows]
    dataset = WindowDataset(store_root, cohort, items, length, grid)
    head = getattr(model, "module", model).head  # DDP keeps the model as .module; FSDP2 shards it in place
    pooled, labels, indices = [], [], []
    hook = head.register_forward_hook(lambda _, args, __: pooled.append(head.pooled(args[0]).float().cpu()))
    model.eval()
    try:
        for x, y, index in ThreadedLoader(dataset, sharded_indices(len(items), env.world_size, env.rank),
                                          config.batch_size, config.loader_workers):
            model(as_model_input(x, env.device))
            labels.append(y)
            indices += index.tolist()
    finally:
        hook.remove()
    gathered = dist_utils.all_gather_objects((torch.cat(pooled), torch.cat(labels), indices))
    features, labels = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
    order, rows = first_rows([i for g in gathered for i in g[2]])
    return features[rows], labels[rows], [dataset.participant(i) for i in order]


def initialise_head(model: SwiFT, targets: list[Target], pooled: torch.Tensor, labels: torch.Tensor,
                    who: list[str], seed: int) -> None:
    """Linear probing before fine-tuning (LP-FT, Kumar et al. 2022): the head starts as the
    cross-validated logistic or ridge model of the training participants' mean standardised pooled
    features (the head's own standardisation, already calibrated), so fine-tuning starts from a head
    that already reads the backbone instead of pulling the backbone towards a random one. Fitted per
    participant, not per window: a linear head's mean window output is its output on the mean
    features, which is what subject-level evaluation scores, and a participant's mean holds a slow
    effect that a single window samples noisily. Each binary or regression output is then rescaled
    to the windows it is trained on (one slope and offset, fitted on the training windows' outputs):
    a direction fitted on means gives single windows overconfident outputs, and fine-tuning would
    first spend its steps undoing that."""
    from neurox.analysis.baseline import fit_linear, linear_design

    head = model.head
    standardised = (pooled - head.feature_mean.cpu()) / head.feature_std.cpu()
    members: dict[str, list[int]] = {}
    for row, p in enumerate(who):
        members.setdefault(p, []).append(row)
    participants = sorted(members)
    x = torch.stack([standardised[members[p]].mean(0) for p in participants]).double().numpy()
    y = torch.stack([labels[members[p][0]] for p in participants]).double().numpy()
    weight, bias = torch.zeros_like(head.head.weight), torch.zeros_like(head.head.bias)
    if targets[0].task == "multiclass":
        fits = [(slice(None), fit_linear(x, y[:, 0], "multiclass", seed))]
    else:
        design = linear_design(x)
        fits = [(slice(i, i + 1), fit_linear(x, y[:, i], t.task, seed, design)) for i, t in enumerate(targets)]
    for rows, fit in fits:
        coef = fit["coef"] / fit["scale"]
        intercept = fit["intercept"] - coef @ fit["mean"]
        if targets[0].task == "multiclass" and coef.shape[0] == 1:  # two classes present: one logit
            coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
        if targets[0].task != "multiclass":
            column = rows.start
            coef, intercept = _window_scale(standardised.double().numpy() @ coef.T + intercept,
                                            labels[:, column].double().numpy(), targets[column].task, coef, intercept)
        weight[rows] = torch.as_tensor(coef, dtype=weight.dtype)
        bias[rows] = torch.as_tensor(np.atleast_1d(intercept), dtype=bias.dtype)
    with torch.no_grad():
        head.head.weight.copy_(weight)
        head.head.bias.copy_(bias)


def _window_scale(outputs: np.ndarray, y: np.ndarray, task: str, coef, intercept):
    """``coef`` and ``intercept`` times the slope, plus the offset, of the best 1D fit of the windows'
    labels on their outputs (logistic for binary, least squares for regression); unchanged when the
    slope is not positive (the participant-level direction does not hold for single windows)."""
    z = outputs.reshape(-1)
    if task == "regression":
        slope = float(np.cov(z, y)[0, 1] / max(z.var(ddof=1), 1e-12))
        offset = float(y.mean() - slope * z.mean())
    else:
        from sklearn.linear_model import LogisticRegression

        if len(np.unique(y)) < 2:
            return coef, intercept
        fit = LogisticRegression(C=1e4, max_iter=1000).fit(z[:, None], y.astype(int))
        slope, offset = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if not np.isfinite(slope) or slope <= 0:
        return coef, intercept
    return coef * slope, intercept * slope + offset


def _full_model_state(wrapped) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def final_evaluation(run_dir, store, cohort, targets, length, grid, env, config, motion) -> dict:
    """Val and test metrics of the best validation model; predictions.tsv for both splits."""
    from neurox.hub import load_pretrained

    best = load_pretrained(run_dir / "model").to(env.device)
    results, rows = {}, []
    for split in ("val", "test"):
        if not cohort.in_split(split):
            continue
        metrics, subjects, outputs = split_metrics(best, store.root, cohort, targets, split, length, grid, env,
                                                   config.batch_size, config.precision, config.n_boot, motion,
                                                   progress=f"best model, {split}")
        results[split] = metrics
        rows += prediction_rows(targets, cohort.values, split, subjects, outputs)
    if env.is_main:
        if add_gaps(targets, rows):  # the gap correction, fitted on the validation participants, kept with the run
            write_json(run_dir / "targets.json", {"targets": [t.to_dict() for t in targets],
                                                  "participants_left_out": cohort.left_out})
        write_json(run_dir / "metrics.json", results)
        write_predictions(run_dir / "predictions.tsv", targets, rows, motion, cohort.person)
    return results


def recentre_head(model, targets: list[Target], thresholds: np.ndarray) -> dict[str, str]:
    """Lower the head's output bias by ``thresholds`` (``decision_thresholds``), so that the model's class decision
    at 0 (at the argmax) is the recentred one; each class target's ``threshold`` records it. Returns, per target
    moved, what the model card says of it."""
    notes = {}
    with torch.no_grad():
        model.head.head.bias -= torch.as_tensor(thresholds, dtype=model.head.head.bias.dtype)
    if targets[0].task == "multiclass":
        t = targets[0]
        t.threshold = [float(v) for v in thresholds]
        moved = ", ".join(f"{c} {v:.4g}" for c, v in zip(t.classes, thresholds))
        notes[f"decision for {t.column}"] = (f"at the largest output, after the trained head's logits were lowered "
                                             f"by {moved}: where the validation participants, every class counted "
                                             "equally, are given each class with the same mean probability")
        return notes
    for t, value in zip(targets, thresholds):
        if t.task == "binary":
            t.threshold = float(value)
            notes[f"decision for {t.column}"] = (f"at output 0, where the trained head's logit {value:.4g} was "
                                                 "moved: halfway between the two classes' median outputs on the "
                                                 "validation participants")
    return notes


def _card(config, targets, step, metrics, recentred: dict[str, str]) -> dict:
    return {
        "data": f"store {config.store}",
        "objective": f"supervised {', '.join(f'{t.column} ({t.task})' for t in targets)}; "
                     f"{'linear probe' if config.freeze else 'fine-tuned'}"
                     f"{' from ' + config.init if config.init else ' from scratch'}",
        "metrics": {"validation at step": step,
                    **{k: v for k, v in metrics.items() if not k.endswith(("_low", "_high"))}},
        "notes": recentred,
    }


