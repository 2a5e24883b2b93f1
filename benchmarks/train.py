"""Fine-tuning throughput against the backbone's own forward+backward rate, same config and batch.

The backbone rate is forward + backward of the demo model on a batch already in memory; the
fine-tuning rate is what ``neurox finetune`` logs over one epoch on a prepared synthetic store
(loader threads, float16 -> float32, loss, optimiser step, logging included). Their ratio says
how much the loader and the loop cost. Prints one JSON document.

    python benchmarks/train.py --workdir /tmp/neurox-bench-train
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def backbone_rate(batch: int, repeats: int = 10) -> float:
    from neurox.config import preset
    from neurox.models import SwiFT, build_head

    config = preset("demo")
    model = SwiFT(config, build_head("multilabel", config.num_features, 3))
    x = torch.randn(batch, 1, *config.img_size)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        model(x).sum().backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def finetune_rate(work: Path, batch: int, subjects: int) -> dict:
    from neurox.data.grid import TargetGrid
    from neurox.data.prepare import prepare
    from neurox.data.preprocess import PrepareOptions
    from neurox.data.synthetic import SynthOptions, synthesize
    from neurox.train.finetune import FinetuneConfig, finetune

    cohort = work / "cohort"
    if not (cohort / "participants.tsv").exists():
        synthesize(cohort, SynthOptions(n_subjects=subjects, n_frames=100, voxel_size_mm=4.0), progress=False)
    store = work / "store"
    prepare(cohort, store, PrepareOptions(grid=TargetGrid.default(4.0)), workers=2, progress=False)
    run = work / f"run-b{batch}"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    finetune(FinetuneConfig(store=str(store), target="amplitude_group,coupling_group,order_group", out=str(run),
                            epochs=1, batch_size=batch, n_boot=10, loader_workers=2))
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "windows_per_s" in s]
    return {"steps": len(steps), "windows_per_s": steps[-1]["windows_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/neurox-bench-train")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--subjects", type=int, default=48)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    backbone = backbone_rate(args.batch)
    finetune = finetune_rate(work, args.batch, args.subjects)
    print(json.dumps({
        "benchmark": "train", "preset": "demo", "batch": args.batch,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "backbone_forward_backward_windows_per_s": round(backbone, 2),
        "finetune_windows_per_s": finetune["windows_per_s"], "finetune_steps": finetune["steps"],
        "ratio": round(finetune["windows_per_s"] / backbone, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
