"""``neurox pretrain``: self-supervised pretraining on one or many stores, no labels needed.

Each item is a participant: two windows of their runs (two runs when they have several, from any of their
sessions, else two starts of one run). The contrastive objective (``instance`` or ``local_temporal`` mode) or masked
image modelling (``mim``) is computed by ``PretrainModel.forward``, so DDP and FSDP2 wrap it like
any model. Stores are sampled with weights (``--store_weight``) and must share one input
contract (grid, voxel size, normalisation, channels). The engine, checkpoints (sharded, resumable
on another number of processes), SIGTERM handling and non-finite-loss stop are the fine-tuning
engine's. Outputs in ``--out``: ``model/`` (the backbone as a model directory with its input
contract and a model card; ``neurox finetune --init`` takes it), ``config.yaml``,
``metrics.jsonl``, ``checkpoints/last/``.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from neurox.config import InputContract, SwiFTConfig, preset
from neurox.data.loader import fit_to_grid, prepared_runs
from neurox.data.store import Store
from neurox.io.atomic import write_text_atomic
from neurox.models import SwiFT
from neurox.models.heads import ContrastiveProjection
from neurox.train import distributed as dist_utils
from neurox.train import ssl
from neurox.train.engine import PRECISIONS, LoopSettings, Trainer, run_environment, start_run

CONTRACT_KEYS = ("grid", "voxel_size_mm", "normalization", "channels", "origin_mm", "denoising")


@dataclass
class PretrainConfig:
    """Every option of a pretraining run (the YAML given to ``--config`` uses these names)."""

    store: list[str] = field(default_factory=list)  # one or more stores
    out: str = ""  # the run directory to write; the model goes to OUT/model
    store_weight: list[float] | None = None  # sampling weight per store (default: by participants)
    objective: str = "contrastive"  # contrastive or mim
    contrastive_mode: str = "instance"  # instance or local_temporal
    temperature: float = 0.1  # contrastive: of the softmax over cosine similarities
    projection_dim: int = 128  # contrastive: size of the projection the loss compares
    mask_ratio: float = 0.6  # MIM: fraction of the tokens hidden
    mask_shape: str = "random"  # random (4D tokens) or tube (spatial positions, every frame)
    decoder_depth: int = 0  # MIM: transformer layers before the linear voxel map (0: SimMIM's linear head)
    augment: bool = True  # random affine, noise and smoothing per sample, on the device
    preset: str = "demo"  # architecture when there is no --init: demo (small, 4 mm) or swift_paper
    init: str | None = None  # continue from a model directory's backbone
    epochs: int = 10  # passes over the participants (or draws of --items_per_epoch)
    items_per_epoch: int | None = None  # participants drawn per epoch (default: all, once)
    batch_size: int = 4  # participants per process and step
    accumulation: int = 1  # steps whose gradients add up before one update (a larger batch without memory)
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.05  # AdamW's decoupled weight decay
    warmup_fraction: float = 0.1  # of the steps, with the learning rate rising linearly; then cosine decay
    clip_grad: float = 1.0  # largest gradient norm (0: no clipping)
    precision: str = "fp32"  # fp32, bf16, fp16
    strategy: str = "ddp"  # ddp (replicas) or fsdp (sharded), with several processes
    loader_workers: int = 2  # threads reading windows per process
    grad_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower steps
    seed: int = 0  # fixes the draws of participants, windows, masks and augmentations
    deterministic: bool = False  # deterministic kernels where torch has them (slower), for runs that repeat exactly
    checkpoint_every: int = 0  # steps between checkpoints; 0: at epoch ends (and on SIGTERM)
    max_steps: int | None = None  # stop after this many steps (the learning-rate schedule ends there)
    resume: bool = False  # continue the run in --out from its last checkpoint
    device: str = "auto"  # auto (the accelerator if any), cpu, cuda, xpu ...

    def settings(self) -> LoopSettings:
        return LoopSettings(self.epochs, self.batch_size, self.accumulation, self.lr, self.weight_decay,
                            self.warmup_fraction, self.clip_grad, self.precision, self.loader_workers, self.seed,
                            self.checkpoint_every, self.max_steps)

    def validate(self) -> None:
        if not self.store or not self.out:
            raise ValueError("pretrain needs --store (one or more) and --out")
        self.settings()  # the loop's counts and rates, refused by name where out of range
        if self.objective not in ssl.OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(ssl.OBJECTIVES)}")
        if self.contrastive_mode not in ssl.CONTRASTIVE_MODES:
            raise ValueError(f"unknown contrastive mode {self.contrastive_mode!r}; choose one of "
                             f"{', '.join(ssl.CONTRASTIVE_MODES)}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"--mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_depth < 0:
            raise ValueError(f"--decoder_depth must be 0 or more, got {self.decoder_depth}")
        if self.mask_shape not in ssl.MASK_SHAPES:
            raise ValueError(f"unknown --mask_shape {self.mask_shape!r}; choose one of {', '.join(ssl.MASK_SHAPES)}")
        if self.store_weight is not None and (len(self.store_weight) != len(self.store)
                                              or min(self.store_weight) < 0 or sum(self.store_weight) <= 0):
            raise ValueError(f"--store_weight needs one non-negative weight per store ({len(self.store)}), "
                             "not all zero")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")


# --- data ---------------------------------------------------------------------------------------------


def check_contracts(stores: list[Store]) -> dict:
    """The stores' shared input contract; one line naming the first store and setting that differs."""
    first = stores[0].info
    for store in stores[1:]:
        for key in CONTRACT_KEYS:
            if store.info.get(key) != first.get(key):
                raise ValueError(f"{store.root} has {key} {store.info.get(key)} but {stores[0].root} has "
                                 f"{first.get(key)}; stores pretrained together must share one input contract "
                                 "(prepare them with the same --like MODEL_DIR or the same flags)")
    return {key: first.get(key) for key in CONTRACT_KEYS}


class ParticipantPairs:
    """Items are (store index, participant); an item gives two windows of that participant
    ``(2, C, T, X, Y, Z)`` float16 and the brain mask on the model grid ``(X, Y, Z)``, drawn from
    (seed, epoch, item position) so that a resumed run reads the same windows."""

    def __init__(self, stores: list[Store], length: int, grid, seed: int):
        self.stores, self.length, self.grid, self.seed = stores, length, tuple(grid), seed
        self.runs: list[dict[str, list[tuple[str, int]]]] = []  # per store: participant -> (run id, frames)
        for store in stores:
            # the instance is the person, whatever unit the store's labels have: a person's sessions are
            # positives of each other, never negatives
            run_ids, n_frames = prepared_runs(store, by_person=True)
            long_enough = {p: [(r, n_frames[r]) for r in ids if n_frames[r] >= length] for p, ids in run_ids.items()}
            self.runs.append({p: runs for p, runs in long_enough.items() if runs})
        self._brains: dict[tuple[int, str], np.ndarray] = {}  # (store, run id) -> brain mask on the model grid
        if not any(self.runs):
            raise ValueError(f"no run in {', '.join(str(s.root) for s in stores)} has the {length} frames of one "
                             "window")
        self.items: list[tuple[int, str]] = []
        self.epoch = 0

    def participants(self) -> list[tuple[int, str]]:
        return [(s, p) for s, runs in enumerate(self.runs) for p in sorted(runs)]

    def __len__(self) -> int:
        return len(self.items)

    def participant(self, index: int) -> str:
        s, p = self.items[index]
        return f"{p} ({self.stores[s].root})" if len(self.stores) > 1 else p

    def __getitem__(self, index: int):
        s, pid = self.items[index]
        rng = np.random.default_rng([self.seed, self.epoch, index, zlib.crc32(pid.encode())])
        runs = self.runs[s][pid]
        picks = rng.choice(len(runs), size=2, replace=len(runs) < 2)
        windows = []
        for k in picks:
            run_id, n = runs[k]
            start = int(rng.integers(0, n - self.length + 1))
            windows.append(fit_to_grid(self.stores[s].read_frames(run_id, start, self.length), self.grid))
        return torch.from_numpy(np.stack(windows)), torch.from_numpy(self.brain(s, runs[picks[0]][0])), index

    def brain(self, store_index: int, run_id: str) -> np.ndarray:
        """The run's brain mask on the model grid, unpacked once per run (not once per item)."""
        key = (store_index, run_id)
        if key not in self._brains:
            mask = self.stores[store_index].mask(run_id)
            self._brains[key] = fit_to_grid(mask[None, None].astype(np.float16), self.grid)[0, 0] > 0.5
        return self._brains[key]


def epoch_items(data: ParticipantPairs, weights: list[float] | None, seed: int, epoch: int,
                per_epoch: int | None) -> list[tuple[int, str]]:
    """The participants of an epoch: each store contributes in proportion to its weight (drawn with
    replacement when weighted), else every participant once; the order is fixed by (seed, epoch)."""
    everyone = data.participants()
    rng = np.random.default_rng([seed, epoch, 7])
    if weights is None and per_epoch is None:
        order = rng.permutation(len(everyone))
        return [everyone[i] for i in order]
    n = per_epoch or len(everyone)
    w = np.array(weights if weights is not None else [len(r) for r in data.runs], dtype=float)
    w = np.where([len(r) > 0 for r in data.runs], w, 0.0)
    counts = rng.multinomial(n, w / w.sum())
    items = []
    for s, count in enumerate(counts):
        members = sorted(data.runs[s])
        items += [(s, members[i]) for i in rng.integers(0, len(members), size=count)]
    order = rng.permutation(len(items))
    return [items[i] for i in order]


# --- model ---------------------------------------------------------------------------------------------


class PretrainModel(nn.Module):
    """The backbone and what its objective adds: a projection (contrastive) or a mask token and a
    light decoder (MIM). ``forward(pairs, brain, generator)`` returns the loss."""

    def __init__(self, backbone: SwiFT, config: PretrainConfig):
        super().__init__()
        self.backbone, self.objective = backbone, config.objective
        self.mode, self.temperature = config.contrastive_mode, config.temperature
        self.ratio, self.mask_shape = config.mask_ratio, config.mask_shape
        self.augment = config.augment
        arch = backbone.config
        if config.objective == "contrastive":
            self.projection = ContrastiveProjection(arch.num_features, config.projection_dim)
        else:
            self.mask_token = nn.Parameter(torch.zeros(arch.embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            self.decoder = mim_decoder_for(arch, config.decoder_depth)

    def views(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return ssl.augment(x, generator) if self.augment else x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone.forward_features(x))

    def forward(self, pairs: torch.Tensor, brain: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """pairs (B, 2, C, T, X, Y, Z) as stored; brain (B, X, Y, Z) bool."""
        b = pairs.shape[0]
        x = pairs.float().permute(0, 1, 2, 4, 5, 6, 3)  # (B, 2, C, X, Y, Z, T)
        first, second = x[:, 0], x[:, 1]
        if self.objective == "mim":
            arch = self.backbone.config
            hidden = ssl.token_mask(b, arch.patch_grid, self.ratio, generator, x.device, self.mask_shape)
            source = self.views(first, generator)
            features = self.backbone.forward_features(source, hidden, self.mask_token)
            reconstruction = self.decoder(features)
            voxels = ssl.voxel_mask(hidden, arch.patch_size)
            return ssl.mim_loss(reconstruction, source, voxels, brain[:, None, :, :, :, None])
        if self.mode == "instance":
            both = torch.cat([self.views(first, generator), self.views(second, generator)])
            z = self.embed(both)
            return ssl.nt_xent(z[:b], z[b:], self.temperature)
        views = torch.cat([self.views(first, generator), self.views(first, generator),
                           self.views(second, generator), self.views(second, generator)])
        z = self.embed(views).view(4, b, -1).transpose(0, 1)  # (B, 4, D)
        return ssl.local_temporal_loss(z, self.temperature)


def mim_decoder_for(arch: SwiFTConfig, depth: int = 0) -> ssl.MIMDecoder:
    last = arch.num_stages - 1
    return ssl.MIMDecoder(arch.num_features, arch.patch_size, arch.in_chans, 2**last, arch.stage_grid(last), depth)


# --- the run ---------------------------------------------------------------------------------------------


def pretrain(config: PretrainConfig) -> Path:
    return dist_utils.launch(_pretrain, config)


def _pretrain(config: PretrainConfig, env: dist_utils.Env) -> Path:
    config.validate()
    run_dir = Path(config.out)
    start_run(run_dir, "pretrain", config.resume, config.seed, config.deterministic)
    stores = [Store(s) for s in config.store]
    contract_info = check_contracts(stores)
    if config.init:
        from neurox.hub import load_pretrained, read_config

        arch = SwiFTConfig.from_dict(read_config(config.init)["model"])
    else:
        arch = preset(config.preset)
    from neurox.train.runs import check_contract, check_fits_store, check_trs

    check_trs(stores, env.is_main)
    for store in stores:
        check_fits_store(arch, store)
        if config.init:
            check_contract(read_config(config.init)["input_contract"], store, config.init, env.is_main)
    length, grid = arch.img_size[3], arch.img_size[:3]
    data = ParticipantPairs(stores, length, grid, config.seed)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not config.resume:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        resolved = {**dataclasses.asdict(config), "model": arch.to_dict(), "world_size": env.world_size,
                    "device": str(env.device), "input_contract": contract_info,
                    "environment": run_environment(env, stores)}
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    dist_utils.barrier()

    backbone = SwiFT(arch)
    if config.init:
        backbone.load_state_dict(load_pretrained(config.init, with_head=False).state_dict())
    backbone.set_grad_checkpointing(config.grad_checkpointing)
    model = PretrainModel(backbone, config).to(env.device)
    wrapped = dist_utils.wrap(model, env, config.strategy)

    trainer: Trainer | None = None

    def make_items(epoch: int):
        return epoch_items(data, config.store_weight, config.seed, epoch, config.items_per_epoch)

    def dataset_factory(items):  # called by the loop at the start of each epoch
        data.items, data.epoch = items, trainer.step // trainer.steps_per_epoch
        return data

    def loss_fn(module, pairs, brain):
        # augmentation and masking randomness from (seed, step, rank): the same on a resumed run
        generator = torch.Generator().manual_seed(int(zlib.crc32(f"{config.seed}-{trainer.step}-{env.rank}".encode())))
        return module(pairs, brain, generator)

    trainer = Trainer(wrapped, loss_fn, config.settings(), env, run_dir, make_items, dataset_factory)
    if config.resume and trainer.load_checkpoint() and env.is_main:
        print(f"resumed {run_dir} at step {trainer.step} of {trainer.total_steps}")
    outcome = trainer.fit()
    if outcome == "stopped":
        if env.is_main:
            print(f"stopped by {trainer.stopped_by} at step {trainer.step}; continue with --resume true")
        return run_dir
    save_backbone(wrapped, arch, run_dir, config, stores, trainer, env)
    return run_dir


def save_backbone(wrapped, arch: SwiFTConfig, run_dir: Path, config: PretrainConfig, stores: list[Store],
                  trainer: Trainer, env: dist_utils.Env) -> None:
    """The backbone as a model directory: weights, input contract, a model card."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main:
        return
    from neurox.hub import save_pretrained
    from neurox.train.runs import store_contract, store_template, store_tr

    backbone = SwiFT(arch)
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    templates = {store_template(s.info) for s in stores}  # cohorts in two templates: not one to record
    # where any store was resampled in time, prepare --like resamples new data (a run at the TR stays as it is)
    descs = {s.info.get("bold_desc", "preproc") for s in stores}
    across_stores = {"tr_resampled": any(s.info.get("resample_tr") is not None for s in stores),
                     "space": templates.pop() if len(templates) == 1 else None,
                     "bold_desc": descs.pop() if len(descs) == 1 else None}
    contract = InputContract.for_model(arch, tr=store_tr(stores[0]), **store_contract(stores[0].info) | across_stores)
    losses = [r["loss"] for r in trainer.history if "loss" in r]
    decoder = (f"decoder of {config.decoder_depth} transformer layers and a linear map" if config.decoder_depth
               else "linear decoder")
    objective = (f"contrastive ({config.contrastive_mode}, NT-Xent, temperature {config.temperature})"
                 if config.objective == "contrastive" else
                 f"masked image modelling ({config.mask_shape} mask, ratio {config.mask_ratio}, {decoder}, "
                 "L1 on masked in-brain voxels)")
    n_participants = sum(len(prepared_runs(s, by_person=True)[0]) for s in stores)
    card = {"data": f"{n_participants} participants from {len(stores)} store(s): "
                    + ", ".join(str(s.root) for s in stores),
            "objective": f"self-supervised {objective}; {trainer.step} steps, global batch {trainer.global_batch}",
            "metrics": {"first_loss": losses[0] if losses else None,
                        "final_loss": losses[-1] if losses else None},
            "notes": "backbone only (the projection or decoder of the objective is not kept); fine-tune with "
                     "`neurox finetune --init DIR`, or probe with `--init DIR --freeze true`."}
    save_pretrained(backbone, run_dir / "model", contract=contract, card=card,
                    source={"run": str(run_dir), "step": trainer.step, "objective": config.objective})
