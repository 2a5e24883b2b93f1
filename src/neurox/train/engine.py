"""The training loop: one loop for one CPU, one GPU, or many processes across nodes.

A step is one optimiser update over the global batch (per-process batch x processes x gradient
accumulation). The windows of an epoch and their order are a function of (seed, epoch), so a run
resumed at step k of an epoch sees exactly the batches it would have seen. Checkpoints hold the
model, optimiser, scheduler, position and RNG states, and are written at the end of each epoch,
every ``checkpoint_every`` steps, and when SIGTERM (the signal a cluster sends before pre-emption) or a
Ctrl-C arrives, after which the run exits cleanly. They are ``torch.distributed.checkpoint``
directories: every process writes its own shards (FSDP) in parallel, and a run resumes on any
number of processes. A checkpoint is written beside the last one and swapped in when complete.
A non-finite loss stops the run with the step and the batch's participants, leaving the last good
checkpoint in place.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from neurox.data.loader import ThreadedLoader, WindowDataset
from neurox.errors import UserFacingError
from neurox.io.atomic import write_atomic, write_text_atomic
from neurox.progress import progress
from neurox.train import distributed as dist_utils

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLoss(UserFacingError):
    pass


class StepSampler(Sampler):
    """This process's share of the items of steps ``start_step``.. of an epoch: step s covers items
    [s G, (s + 1) G) of the epoch's order (G the global batch); process r takes its contiguous
    slice of each micro-batch, so one process with batch G sees what N processes see together."""

    def __init__(self, n_items: int, batch: int, world: int, rank: int, accumulation: int, start_step: int):
        self.global_batch = batch * world * accumulation
        self.steps = n_items // self.global_batch
        self.batch, self.world, self.rank, self.accumulation = batch, world, rank, accumulation
        self.start_step = start_step

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            for micro in range(self.accumulation):
                first = step * self.global_batch + (micro * self.world + self.rank) * self.batch
                yield from range(first, first + self.batch)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accumulation * self.batch


def sharded_indices(n: int, world: int, rank: int) -> list[int]:
    """Evaluation items for a process; padded (repeating the last item) so every process runs the
    same number of batches, which sharded models need. Duplicates are dropped after gathering."""
    per = math.ceil(n / world)
    return [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)]


def warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@dataclass
class LoopSettings:
    epochs: int
    batch_size: int
    accumulation: int
    lr: float
    weight_decay: float
    warmup_fraction: float
    clip_grad: float
    precision: str
    loader_workers: int
    seed: int
    checkpoint_every: int
    max_steps: int | None = None
    backbone_lr_scale: float = 1.0  # of every parameter not in the head: a gentler step for pretrained weights
    val_every: int = 0  # steps between validations besides each epoch's end; 0: at epoch ends only

    def __post_init__(self):
        """Counts and rates out of range are refused by name, before any run folder is made."""
        rules = (("epochs", self.epochs >= 1, "1 or more"), ("batch_size", self.batch_size >= 1, "1 or more"),
                 ("accumulation", self.accumulation >= 1, "1 or more"),
                 ("lr", self.lr >= 0, "0 or more (0: nothing trains)"),
                 ("weight_decay", self.weight_decay >= 0, "0 or more"),
                 ("warmup_fraction", 0 <= self.warmup_fraction < 1, "a fraction from 0 to below 1"),
                 ("clip_grad", self.clip_grad >= 0, "0 or more (0: no clipping)"),
                 ("loader_workers", self.loader_workers >= 0, "0 or more (0: read in the training thread)"),
                 ("checkpoint_every", self.checkpoint_every >= 0, "0 or more (0: at epoch ends)"),
                 ("max_steps", self.max_steps is None or self.max_steps >= 0, "0 or more (0: no limit)"),
                 ("val_every", self.val_every >= 0, "a number of steps, or 0 for epoch ends only"),
                 ("backbone_lr_scale", self.backbone_lr_scale >= 0, "a fraction of --lr, 0 or more"))
        for name, ok, wanted in rules:
            if not ok:
                raise ValueError(f"--{name} {getattr(self, name)}: give {wanted}")


class StopSignals:
    """Records SIGTERM (what a cluster sends before pre-emption) and a first Ctrl-C (SIGINT); the loop checks
    between steps, then checkpoints and stops. A second Ctrl-C interrupts at once, without the checkpoint."""

    def __init__(self):
        self.received: str | None = None  # what stopped the run, as its message names it
        self._first_ctrl_c = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # handlers can only be set from the main thread; such a caller keeps its own
        for signum in (signal.SIGTERM, signal.SIGINT):
            current = signal.getsignal(signum)
            # None: a handler not set from Python, left alone; an ignored Ctrl-C (a background job) stays ignored
            if current is None or (signum == signal.SIGINT and current is signal.SIG_IGN):
                continue
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self._first_ctrl_c:
                # a launcher (torchrun) passes on the Ctrl-C its process group already had: only a second press,
                # not that echo a moment later, stops the run without its checkpoint
                if time.monotonic() - self._first_ctrl_c > 1.0:
                    raise KeyboardInterrupt
                return
            self._first_ctrl_c = time.monotonic()
            print("\nCtrl-C: stopping after this step, with a checkpoint (press Ctrl-C again to stop at once, "
                  "without one)", file=sys.stderr, flush=True)
        self.received = self.received or ("SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)")

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def rng_states() -> dict[str, Any]:
    """RNG states as tensors and plain data, so that checkpoints load with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       cached], "python": [version, list(internal), gauss]}


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


TRAINER_FILE = "trainer.pt"


def checkpoint_exists(run_dir: Path) -> bool:
    return (Path(run_dir) / "checkpoints" / "last" / TRAINER_FILE).is_file()


@contextlib.contextmanager
def single_process_quiet():
    """Silence torch.distributed.checkpoint's warning that it saves or loads in one process, which a
    single-process run does on purpose (some torch versions warn even with ``no_dist=True``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_sharded(directory: Path, model, optimizer, trainer_state: dict, is_main: bool) -> None:
    """Model and optimiser state as a ``torch.distributed.checkpoint`` directory (each process its
    own shards), plus the loop's state from the main process; written to a temporary directory and
    swapped in, so ``directory`` always holds a complete checkpoint."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    tmp = directory.with_name(f".{directory.name}.tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist_utils.barrier()
    with single_process_quiet():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp),
                 no_dist=not torch.distributed.is_initialized())
    dist_utils.barrier()
    if is_main:
        write_atomic(tmp / TRAINER_FILE, lambda path: torch.save(trainer_state, path))
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    dist_utils.barrier()


def load_sharded(directory: Path, model, optimizer) -> dict:
    """Load a checkpoint written by ``save_sharded`` on any number of processes; the loop's state back."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (directory / TRAINER_FILE).is_file():
        old = directory.with_name(f".{directory.name}.old")  # a swap interrupted between its two renames
        directory = old if (old / TRAINER_FILE).is_file() else directory
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with single_process_quiet():
        dcp.load(state, checkpoint_id=str(directory), no_dist=not torch.distributed.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return torch.load(directory / TRAINER_FILE, map_location="cpu", weights_only=True)


def run_environment(env: dist_utils.Env | None, stores: list) -> dict[str, Any]:
    """What a run's numbers depend on beyond its options, for its config.yaml: the versions, the machine, and
    each store's manifest checksum (the runs read, with their shapes and TRs). ``env`` None: a CPU-only run."""
    import hashlib
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from neurox import __version__

    device = str(env.device) if env else "cpu"
    if env and env.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(env.device)})"
    try:
        sklearn = version("scikit-learn")
    except PackageNotFoundError:
        sklearn = None
    return {"neurox": __version__, "torch": str(torch.__version__), "numpy": np.__version__, "scikit-learn": sklearn,
            "python": platform.python_version(), "platform": platform.platform(), "device": device,
            "world_size": env.world_size if env else 1,
            "stores": {str(s.root): hashlib.sha256((s.root / "manifest.tsv").read_bytes()).hexdigest()
                       for s in stores}}


def start_run(run_dir: Path, command: str, resume: bool, seed: int, deterministic: bool) -> None:
    """Refuse to start over a run unless resuming it, or in a folder of another command's outputs; seed every
    generator."""
    from neurox.io.claim import claim_folder

    if checkpoint_exists(run_dir) and not resume:
        raise ValueError(f"{run_dir} already holds a run; pass --resume true to continue it or choose another --out")
    claim_folder(run_dir, command, {})  # a baseline's metrics.json or a probe's are not a run's to write over
    torch.manual_seed(seed)
    np.random.seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def consolidated_state(directory: Path) -> dict:
    """A sharded checkpoint as one plain dict (``model``, ``optimizer``, plus the loop's state), in
    one process without a model: for inspection, tests and export."""
    import tempfile
    import warnings

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is ... a single process": it is
        path = Path(tmp) / "state.pt"
        dcp_to_torch_save(str(directory), str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {**state, **torch.load(Path(directory) / TRAINER_FILE, map_location="cpu", weights_only=True)}


def parameter_groups(model, settings: LoopSettings) -> list[dict]:
    """The trainable parameters, as one group at ``lr``, or with ``backbone_lr_scale`` set, the head's at
    ``lr`` and the rest at ``lr x backbone_lr_scale`` (discriminative fine-tuning: a pretrained backbone
    moves less than a new head; the schedule scales both alike)."""
    named = [(n.removeprefix("module."), p) for n, p in model.named_parameters() if p.requires_grad]
    if settings.backbone_lr_scale == 1.0:
        return [{"params": [p for _, p in named]}]
    head = [p for n, p in named if n.startswith("head.")]
    backbone = [p for n, p in named if not n.startswith("head.")]
    groups = [{"params": head}, {"params": backbone, "lr": settings.lr * settings.backbone_lr_scale}]
    return [g for g in groups if g["params"]]


class Trainer:
    """Fits ``model`` (already wrapped for parallelism) with ``loss_fn(model, batch, labels)``, the
    batch and labels as the dataset gives them, on the device."""

    def __init__(self, model, loss_fn, settings: LoopSettings, env: dist_utils.Env, run_dir: Path,
                 make_items, dataset_factory, evaluate_fn=None):
        self.model, self.loss_fn, self.s, self.env, self.run_dir = model, loss_fn, settings, env, run_dir
        self.make_items = make_items  # epoch -> list of items
        self.dataset_factory = dataset_factory  # items -> WindowDataset
        self.evaluate_fn = evaluate_fn  # () -> (score, metrics), called on every rank
        self.optimizer = torch.optim.AdamW(parameter_groups(model, settings), lr=settings.lr,
                                           weight_decay=settings.weight_decay)
        n_items = len(make_items(0))
        self.global_batch = settings.batch_size * env.world_size * settings.accumulation
        self.steps_per_epoch = n_items // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n_items} training windows are fewer than one global batch ({self.global_batch}); "
                             "lower --batch_size or --accumulation")
        self.total_steps = settings.epochs * self.steps_per_epoch
        if settings.max_steps:
            self.total_steps = min(self.total_steps, settings.max_steps)
        warmup = int(settings.warmup_fraction * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(self.total_steps, warmup))
        self.step = 0
        self.best_score = -math.inf
        self.stopped_by: str | None = None  # set when a signal stopped fit()
        self.history: list[dict] = []
        self.bar = None  # the progress display while fit runs: validation lines are written above it
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=settings.precision == "fp16")
        self.checkpoint_path = run_dir / "checkpoints" / "last"
        self.tensorboard = None
        if env.is_main:
            try:  # TensorBoard when installed; metrics.jsonl always
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass

    # --- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        state = {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                 "best_score": self.best_score, "history": self.history, "rng": rng_states(),
                 "world_size": self.env.world_size}
        save_sharded(self.checkpoint_path, self.model, self.optimizer, state, self.env.is_main)

    def load_checkpoint(self) -> bool:
        if not checkpoint_exists(self.run_dir):
            return False
        state = load_sharded(self.checkpoint_path, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best_score, self.history = state["step"], state["best_score"], state["history"]
        set_rng_states(state["rng"])
        return True

    # --- loop -------------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.env.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tensorboard is not None:
                flat = {**{k: v for k, v in record.items() if k not in ("step", "val")},
                        **{f"val/{k}": v for k, v in record.get("val", {}).items()}}
                for key, value in flat.items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        self.tensorboard.add_scalar(key, value, record["step"])

    def validate(self, on_best=None, epoch: int | None = None) -> None:
        """One validation pass at the current step, logged; ``on_best(step, metrics)`` where its score is
        the best so far. ``fit`` calls it after every epoch; before ``fit``, it scores the starting model."""
        score, metrics = self.evaluate_fn()
        self.model.train()
        self.log({"step": self.step, **({"epoch": epoch} if epoch is not None else {}), "val": metrics})
        best = score > self.best_score
        if self.env.is_main:
            line = f"step {self.step}: validation {summary(metrics, HEADLINE)}" + (" (best so far)" if best else "")
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, file=sys.stderr, flush=True)
        if best:
            self.best_score = score
            if on_best is not None:
                on_best(self.step, metrics)

    def fit(self, on_best=None) -> str:
        """Train to the end (or to SIGTERM or Ctrl-C: ``stopped_by`` says which); returns "done" or "stopped"."""
        s, env = self.s, self.env
        autocast = torch.autocast(env.device.type, dtype=PRECISIONS[s.precision], enabled=s.precision != "fp32")
        bar = self.bar = progress(total=self.total_steps, initial=self.step, desc="train", unit="step",
                                  disable=not env.is_main)
        with StopSignals() as signals:
            while self.step < self.total_steps:
                epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
                items = self.make_items(epoch)
                dataset: WindowDataset = self.dataset_factory(items)
                sampler = StepSampler(len(items), s.batch_size, env.world_size, env.rank, s.accumulation, in_epoch)
                loader = ThreadedLoader(dataset, sampler, s.batch_size, s.loader_workers, drop_last=True)
                self.model.train()
                micro, loss_sum, windows, started = 0, 0.0, 0, time.perf_counter()
                for x, labels, index in loader:
                    x = x.to(env.device, non_blocking=True)
                    labels = labels.to(env.device, non_blocking=True)
                    with autocast:
                        loss = self.loss_fn(self.model, x, labels)
                    if not torch.isfinite(loss).all():
                        who = sorted({dataset.participant(int(i)) for i in index})
                        last = (f"the last good checkpoint is {self.checkpoint_path}"
                                if checkpoint_exists(self.run_dir) else "no checkpoint was written yet")
                        raise NonFiniteLoss(f"loss is {loss.item()} at step {self.step + 1} (epoch {epoch}); batch "
                                            f"participants: {', '.join(who)}; {last}")
                    self.scaler.scale(loss / s.accumulation).backward()
                    loss_sum += loss.item()
                    windows += x.shape[0]
                    micro += 1
                    if micro % s.accumulation:
                        continue
                    self.scaler.unscale_(self.optimizer)
                    if s.clip_grad:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.clip_grad)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()
                    self.step += 1
                    rate = windows * env.world_size / (time.perf_counter() - started)
                    record = {"step": self.step, "epoch": epoch, "loss": loss_sum / s.accumulation,
                              "lr": self.scheduler.get_last_lr()[0], "windows_per_s": round(rate, 2)}
                    self.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", win_s=f"{rate:.1f}")
                    bar.update(1)
                    loss_sum = 0.0
                    end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                    # a checkpoint follows every validation, so a resumed run knows the best score so far
                    validated = self.evaluate_fn is not None and (
                        end_of_epoch or bool(s.val_every and self.step % s.val_every == 0))
                    if validated:
                        self.validate(on_best, epoch)
                    stop = dist_utils.all_reduce_flag(signals.received is not None)
                    periodic = bool(s.checkpoint_every and self.step % s.checkpoint_every == 0)
                    if end_of_epoch or validated or stop or periodic:
                        self.save_checkpoint()
                    if stop:
                        bar.close(stopped=True)
                        self.bar = None
                        self.stopped_by = signals.received or "a signal to another process"
                        return "stopped"
                    if self.step >= self.total_steps:
                        break
        bar.close()
        self.bar = None
        return "done"


# what a validation line in the log shows of each target (metrics.jsonl has them all)
HEADLINE = ("auroc", "balanced_accuracy", "mae", "pearson_r", "mean_fd_r")


def summary(metrics: dict, only: tuple[str, ...] | None = None) -> str:
    """``auroc 0.937 [0.890, 0.975] (p 0.001), ..., n 96``: the metrics (of the names in ``only``, when given, with
    or without a target's prefix) with their intervals, permutation p-values or standard deviations over folds,
    on one line."""
    shown = [f"{k} {v:.3f}" + (f" [{metrics[k + '_ci_low']:.3f}, {metrics[k + '_ci_high']:.3f}]"
                                if k + "_ci_low" in metrics and k + "_ci_high" in metrics else "")
             + (f" (p {metrics[k + '_p']:.2g})" if k + "_p" in metrics else "")
             + (f" (sd {metrics[k + '_sd']:.3f})" if k + "_sd" in metrics else "")
             for k, v in metrics.items()
             if not k.endswith(("_ci_low", "_ci_high", "_p", "_sd")) and k != "n_subjects"
             and isinstance(v, (int, float)) and (only is None or k.rsplit(".", 1)[-1] in only)]
    return ", ".join(shown) + (f", n {metrics['n_subjects']}" if "n_subjects" in metrics else "")


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=float) + "\n")
