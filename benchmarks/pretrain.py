"""Pretraining step throughput and peak memory per objective, with and without activation checkpointing.

One step = augmentation (or masking) + forward + loss + backward + AdamW step of ``PretrainModel``
on a batch of participant pairs already in memory (the loader is measured by benchmarks/data.py and
benchmarks/train.py). Windows/s counts every window the backbone sees (contrastive instance: 2 per
participant, local_temporal: 4, MIM: 1). Each variant runs in its own process; peak memory is CUDA's
allocator peak on a GPU, the process's peak resident memory on a CPU. Prints one JSON document.

    python benchmarks/pretrain.py                           # CPU, demo config, batch 2
    python benchmarks/pretrain.py --device cuda --preset swift_paper --batch 8 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch

VARIANTS = [("contrastive", "instance", 2), ("contrastive", "local_temporal", 4), ("mim", "instance", 1)]


def measure(objective: str, mode: str, checkpointing: bool, args) -> dict:
    from neurox.config import preset
    from neurox.models import SwiFT
    from neurox.train.pretrain import PretrainConfig, PretrainModel

    device = torch.device(args.device)
    arch = preset(args.preset)
    backbone = SwiFT(arch)
    backbone.set_grad_checkpointing(checkpointing)
    model = PretrainModel(backbone, PretrainConfig(objective=objective, contrastive_mode=mode)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y, z, t = arch.img_size
    pairs = torch.randn(args.batch, 2, arch.in_chans, t, x, y, z, device=device).half()
    brain = torch.ones(args.batch, x, y, z, dtype=torch.bool, device=device)
    generator = torch.Generator().manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(pairs, brain, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB
    return {"objective": objective if objective == "mim" else f"contrastive/{mode}", "checkpointing": checkpointing,
            "step_s": round(seconds, 4), "windows_per_s": round(args.batch * VARIANTS_WINDOWS[(objective, mode)]
                                                                 / seconds, 2),
            "peak_memory_gib": round(peak, 3), "loss": round(float(loss), 4)}


VARIANTS_WINDOWS = {(o, m): w for o, m, w in VARIANTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--batch", type=int, default=2, help="participants per step")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--one", nargs=3, metavar=("OBJECTIVE", "MODE", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        objective, mode, checkpointing = args.one
        print(json.dumps(measure(objective, mode, checkpointing == "1", args)))
        return
    import subprocess
    import sys

    results = []
    for checkpointing in (False, True):
        for objective, mode, _ in VARIANTS:
            command = [sys.executable, __file__, "--device", args.device, "--preset", args.preset, "--batch",
                       str(args.batch), "--precision", args.precision, "--repeats", str(args.repeats), "--warmup",
                       str(args.warmup), "--one", objective, mode, str(int(checkpointing))]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                results.append({"objective": f"{objective}/{mode}", "checkpointing": checkpointing,
                                "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"})
            else:
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    report = {"benchmark": "pretrain", "device": args.device, "preset": args.preset, "batch": args.batch,
              "precision": args.precision, "torch": torch.__version__, "machine": platform.machine(),
              "cpu_threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name() if args.device == "cuda"
              else None, "results": results}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
