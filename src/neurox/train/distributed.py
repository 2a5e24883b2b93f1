"""Process groups and parallelism, applied from outside the model.

The launcher is detected from the environment: ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK),
Slurm's ``srun`` (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) or MPI under PBS (PMI_RANK /
PMI_SIZE, OMPI_COMM_WORLD_*, PALS_LOCAL_RANKID). The device comes from ``torch.accelerator``, so
CUDA, ROCm and Intel XPU nodes need no code change; without an accelerator it is the CPU and gloo.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

RANK_VARS = ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
SIZE_VARS = ("WORLD_SIZE", "SLURM_NTASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
LOCAL_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "PALS_LOCAL_RANKID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK")
BACKENDS = {"cuda": "nccl", "xpu": "xccl", "cpu": "gloo"}


@dataclass(frozen=True)
class Env:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first(names, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def detect(device: str | None = None) -> Env:
    """This process's place among the launcher's (rank, world size, local rank) and its device: ``auto`` (or None)
    the accelerator if there is one, else the CPU; ``cpu``; or an accelerator type (``cuda``, ``xpu``), which must
    be there. ``cuda:N`` names the device of a single process."""
    rank, world, local = _first(RANK_VARS, 0), _first(SIZE_VARS, 1), _first(LOCAL_VARS, 0)
    accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if device is None or device == "auto":
        device = accel.type if accel is not None else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return Env(rank, world, local, torch.device("cpu"))
    if accel is None or accel.type != kind:
        from neurox.errors import UserFacingError

        raise UserFacingError(f"--device {device}: torch {torch.__version__} finds no {kind} device"
                              + (f" (it finds {accel.type})" if accel is not None else "")
                              + "; --device auto takes the accelerator there is, else the CPU")
    if index and world > 1:
        raise UserFacingError(f"--device {device}: under a launcher each process takes the device of its local "
                              f"rank; give --device {kind}")
    return Env(rank, world, local, torch.device(kind, int(index) if index else device_index(local, kind)))


def device_index(local_rank: int, device_type: str, visible: int | None = None) -> int:
    """The process's device among the ``visible`` ones (by default, those the process sees): its local rank where
    the node's devices are all visible (torchrun), the only one where the launcher bound one to each process
    (``srun --gpus-per-task=1``, PBS affinity scripts setting CUDA_VISIBLE_DEVICES or ZE_AFFINITY_MASK per rank)."""
    if visible is None:
        visible = torch.accelerator.device_count() if torch.accelerator.is_available() else 0
    if local_rank < visible or visible == 0:  # none visible: torch says so when the device is first used
        return local_rank
    if visible == 1:
        return 0
    raise ValueError(f"this process is local rank {local_rank} of its node, and sees {visible} {device_type} "
                     f"devices: start at most {visible} processes per node, or bind one device to each")


def init(env: Env) -> None:
    """Join the process group (rendezvous through MASTER_ADDR / MASTER_PORT, which torchrun sets;
    Slurm and PBS scripts in examples/ export them)."""
    if not env.distributed or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if env.device.type != "cpu":
        torch.accelerator.set_device_index(env.device.index)
    dist.init_process_group(BACKENDS.get(env.device.type, "gloo"), rank=env.rank, world_size=env.world_size)


@contextmanager
def process_group(env: Env):
    """Inside this process's group: joined first, left after, also on errors."""
    init(env)
    try:
        yield env
    except BaseException:
        shutdown(settle=False)  # the other processes may never reach a barrier
        raise
    shutdown()


def launch(run, config):
    """``run(config, env)`` inside this process's group."""
    with process_group(detect(config.device)) as env:
        return run(config, env)


def shutdown(settle: bool = True) -> None:
    """Leave the process group. With ``settle``, first a barrier: gloo's waits for every earlier
    collective of this process, and while the main thread waits there (without the GIL) the worker
    threads release the tensors of finished collectives. A process that skipped it could reach
    interpreter shutdown while a worker still had to release one, which aborts the process
    ("terminate called without an active exception") after all its work was done."""
    if dist.is_initialized():
        if settle:
            dist.barrier()
        dist.destroy_process_group()
    gc.collect()  # groups kept alive by reference cycles (FSDP's meshes) go now, not at interpreter exit


def wrap(model: nn.Module, env: Env, strategy: str = "ddp") -> nn.Module:
    """DDP (default) or FSDP2 (``fully_shard`` on every block, then the root)."""
    if not env.distributed:
        return model
    if strategy == "ddp":
        ids = [env.device.index] if env.device.type != "cpu" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from neurox.models.swift import SwinBlock

        for block in [m for m in model.modules() if isinstance(m, SwinBlock)]:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"unknown strategy {strategy!r}; choose ddp or fsdp")


def all_gather_objects(obj):
    """Every rank's ``obj``, in rank order (a list of one without a process group)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_flag(flag: bool) -> bool:
    """True on every rank if it is True on any (to stop together)."""
    if not dist.is_initialized():
        return flag
    # NCCL and XCCL groups carry no CPU tensors ("no backend type associated with device type cpu"): there the
    # flag goes through the accelerator that init made current
    device = "cpu" if "cpu:" in dist.get_backend_config() else torch.accelerator.current_accelerator()
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


__all__ = ["Env", "detect", "init", "process_group", "launch", "shutdown", "wrap", "all_gather_objects",
           "broadcast_object", "barrier", "all_reduce_flag"]
