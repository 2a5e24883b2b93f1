"""Backbone speed and memory: the neurox fast path against the published-style naive path.

Each measurement runs in its own process so that peak memory belongs to one path alone: on CPU
the growth of peak resident memory over the forward+backward, on a GPU the peak of allocated
memory. Times are medians over repeats after warm-up. Prints one JSON document.

    python benchmarks/backbone.py                       # CPU: paper config, batch 1, fp32
    python benchmarks/backbone.py --device cuda         # GPU: bf16 fast path vs fp16 naive path
    python benchmarks/backbone.py --preset demo --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def measure(args) -> dict:
    """One path, one precision, in this process."""
    from naive_swift import naive_forward

    from neurox.config import preset
    from neurox.models import SwiFT, build_head

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = preset(args.preset)
    model = SwiFT(config, build_head("binary", config.num_features)).to(device)
    model.set_grad_checkpointing(args.checkpointing)
    forward = model if args.path == "fast" else (lambda x: naive_forward(model, x))
    if args.compile:
        forward = torch.compile(forward)
    x = torch.randn(args.batch, config.in_chans, *config.img_size, device=device)
    dtype = DTYPES[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    scaler_needed = args.dtype == "fp16"

    def step():
        with autocast:
            loss = forward(x).float().sum()
        (loss * 1024.0 if scaler_needed else loss).backward()  # fp16 trains with a loss scale
        model.zero_grad(set_to_none=True)

    def infer():
        with torch.no_grad(), autocast:
            forward(x)

    results = {}
    for name, fn in (("forward", infer), ("forward_backward", step)):
        for _ in range(args.warmup):
            fn()
        synchronize(device)
        if device.type == "cpu":
            rss_before = current_rss_bytes()
        else:
            torch.cuda.reset_peak_memory_stats(device)
            allocated_before = torch.cuda.memory_allocated(device)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        if device.type == "cpu":
            # ru_maxrss only grows: the forward pass measured first never exceeds forward+backward
            peak = peak_rss_bytes() - rss_before
        else:
            peak = torch.cuda.max_memory_allocated(device) - allocated_before
        median = statistics.median(times)
        results[name] = {
            "median_s": round(median, 4),
            "min_s": round(min(times), 4),
            "windows_per_s": round(args.batch / median, 2),
            "peak_memory_gib": round(peak / 2**30, 3),
        }
    return {
        "path": args.path, "dtype": args.dtype, "batch": args.batch, "compile": args.compile,
        "checkpointing": args.checkpointing, **results,
    }


def run_isolated(args, **changes) -> dict:
    argv = [sys.executable, __file__, "--worker"]
    options = {**vars(args), **changes}
    for key in ("device", "preset", "batch", "repeats", "warmup", "path", "dtype"):
        argv += [f"--{key}", str(options[key])]
    for flag in ("compile", "checkpointing"):
        if options[flag]:
            argv.append(f"--{flag}")
    # a fixed mmap threshold makes glibc return every large freed buffer to the OS, so that the
    # growth of peak RSS tracks live tensors rather than the allocator's caching
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"path": options["path"], "dtype": options["dtype"], "error": done.stderr.strip()[-2000:]}
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="swift_paper")
    parser.add_argument("--batch", type=int, default=None, help="default: 1 on CPU, 8 on a GPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", default="fast", choices=["fast", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--compile", action="store_true", help="also measure the fast path under torch.compile")
    parser.add_argument("--checkpointing", action="store_true", help="also measure activation checkpointing")
    args = parser.parse_args()
    if args.batch is None:
        args.batch = 1 if args.device == "cpu" else 8
    if args.worker:
        print(json.dumps(measure(args)))
        return

    gpu = args.device != "cpu"
    # the published code trains in fp16 on GPUs; neurox in bf16
    fast_dtype, naive_dtype = ("bf16", "fp16") if gpu else ("fp32", "fp32")
    runs = {
        "fast": run_isolated(args, path="fast", dtype=fast_dtype, compile=False, checkpointing=False),
        "naive": run_isolated(args, path="naive", dtype=naive_dtype, compile=False, checkpointing=False),
    }
    if args.checkpointing:
        runs["fast_checkpointing"] = run_isolated(args, path="fast", dtype=fast_dtype, compile=False,
                                                  checkpointing=True)
    if args.compile:
        runs["fast_compiled"] = run_isolated(args, path="fast", dtype=fast_dtype, compile=True, checkpointing=False)
    ratios = {}
    naive = runs["naive"].get("forward_backward")
    for name, run in runs.items():
        if name == "naive" or "forward_backward" not in run or naive is None:
            continue
        fb = run["forward_backward"]
        ratios[name] = {
            "time_vs_naive": round(fb["median_s"] / naive["median_s"], 3),
            "throughput_vs_naive": round(fb["windows_per_s"] / naive["windows_per_s"], 2),
            "peak_memory_vs_naive": round(fb["peak_memory_gib"] / max(naive["peak_memory_gib"], 1e-9), 3),
        }
    report = {
        "benchmark": "backbone",
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
        "ratios_forward_backward": ratios,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
