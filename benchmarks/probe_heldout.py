"""Frozen linear probes of pretrained and randomly initialised backbones, on participants none of them saw.

Each backbone embeds every participant of the store once (the mean over their windows of the pooled
backbone output, as ``neurox probe`` and ``neurox embed`` do). The probe (``neurox probe``'s fitting:
standardised features, cross-validated logistic or ridge regression) is then scored by repeated
stratified k-fold cross-validation over all participants: every participant is a test participant
once per repeat, and every backbone is scored on the same folds, so the differences between
backbones are paired. Prints one JSON document (and writes it to --out): per backbone and target,
the AUROC (classes) or Pearson r (numbers) of each repeat's out-of-fold predictions, their mean and
standard deviation, and per pretrained backbone the mean paired difference to the random ones.
Each backbone is also probed with statistics pooling ("NAME/mean_std": each feature's mean and its
standard deviation over time, ``neurox probe --pool mean_std``), from the same pass over the data.
With ``--stages all`` each earlier stage's token-averaged output is probed too ("NAME/stage-N",
compared with the random backbones' same stage); with ``--tokens`` the statistics of each token
position of the last stage, not averaged over space ("NAME/tokens": per position and channel, the
mean and standard deviation over every frame), which keeps what is local, and their time-directed
coupling ("NAME/tokens_lagged": per channel and pair of positions, the antisymmetric part of the
lag-one cross-covariance, which changes sign when which position leads reverses); with ``--tokens_stage
N`` the same per-position statistics of stage N's output before its patch merging ("NAME/tokens-stage-N":
finer positions, fewer channels). With ``--input`` the same statistics of the model input itself, no
backbone: the windows averaged over each last-stage position ("input/tokens", "input/tokens_lagged"), over
each patch ("input/patches": per patch the mean and standard deviation over every frame) and over each
position of a ``--tokens_stage`` ("input/tokens-stage-N"), what a linear probe reads from the data at
those resolutions.

    python benchmarks/probe_heldout.py --store heldout-store --model mim=runs/mim/model --random 0 1 2 \\
        --targets amplitude_group,coupling_group,order_group,lowfreq_score --folds 5 --repeats 5 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def out_of_fold_scores(x: np.ndarray, y: np.ndarray, task: str, folds: int, repeats: int) -> list[float]:
    """One score per repeat: AUROC (binary) or Pearson r (regression) of the out-of-fold outputs."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import KFold, StratifiedKFold

    from neurox.analysis.baseline import fit_linear, linear_outputs

    if task not in ("binary", "regression"):
        raise ValueError(f"probe_heldout scores binary and numeric targets, not {task}")
    scores = []
    for repeat in range(repeats):
        splitter = (KFold if task == "regression" else StratifiedKFold)(folds, shuffle=True, random_state=repeat)
        predicted = np.zeros(len(y))
        for train, test in splitter.split(x, y if task != "regression" else None):
            fitted = fit_linear(x[train], y[train], task, repeat)
            out = linear_outputs(fitted, x[test])
            predicted[test] = out[:, 0]
        if task == "regression":
            scores.append(float(np.corrcoef(predicted, y)[0, 1]))
        else:
            scores.append(float(roc_auc_score(y.astype(int), predicted)))
    return scores


def stage_embeddings(model, store, participants: list[str], batch_size: int, earlier: bool = False,
                     tokens: bool = False, token_stages: tuple[int, ...] = ()) -> dict[str, dict[str, np.ndarray]]:
    """Per participant, the mean over their windows of the backbone's pooled output ("last", as
    ``neurox probe`` embeds), its statistics pooling ("mean_std", as ``neurox probe --pool mean_std``),
    with ``earlier`` each earlier stage's token-averaged output ("stage-1", ...) and with ``tokens``
    the last stage's per-position statistics ("tokens", as ``neurox probe --pool tokens``) and their
    lead-lag ("tokens_lagged"), in one pass; and for each of ``token_stages`` that stage's per-position
    statistics ("tokens-stage-N", as ``neurox probe --pool tokens --stage N``), one more pass each."""
    from neurox.analysis.embed import participant_vector, window_embeddings
    from neurox.data.loader import prepared_runs

    captured: dict[int, list[np.ndarray]] = {}

    def keep(index):
        def hook(_module, _inputs, output):  # stage output: (tokens, batch, channels)
            captured.setdefault(index, []).append(output.float().mean(0).cpu().numpy())
        return hook

    handles = [stage.register_forward_hook(keep(i)) for i, stage in enumerate(model.layers[:-1]) if earlier]
    runs, _ = prepared_runs(store, participants)
    out: dict[str, dict[str, np.ndarray]] = {}
    try:
        for pid in sorted(runs):
            captured.clear()
            _, series = window_embeddings(model, store, runs[pid], batch_size, progress=False, over_time=True,
                                          per_position=tokens)
            if len(series):
                out[pid] = {"last": participant_vector(series, "mean"),
                            "mean_std": participant_vector(series, "mean_std"),
                            **{f"stage-{i + 1}": np.concatenate(v).mean(0) for i, v in captured.items()}}
                if tokens:
                    out[pid]["tokens"] = participant_vector(series, "tokens")
                    out[pid]["tokens_lagged"] = lead_lag(series)
                for stage in token_stages:
                    _, finer = window_embeddings(model, store, runs[pid], batch_size, progress=False,
                                                 over_time=True, per_position=True, stage=stage)
                    out[pid][f"tokens-stage-{stage}"] = participant_vector(finer, "tokens")
    finally:
        for handle in handles:
            handle.remove()
    return out


def input_statistics(store, participants: list[str], config, batch_size: int,
                     token_stages: tuple[int, ...] = ()) -> dict[str, dict[str, np.ndarray]]:
    """Per participant, the readouts of ``stage_embeddings(tokens=True)`` computed on the model input
    (the same windows) averaged over each last-stage position, per patch the mean and standard
    deviation over every frame, and the same over each position of ``token_stages`` but the first (whose
    positions are the patches): the data's own statistics at the backbone's resolutions."""
    import torch
    import torch.nn.functional as F

    from neurox.analysis.embed import participant_vector
    from neurox.data.loader import prepared_runs, run_windows, window_batches

    length, grid = config.img_size[3], config.img_size[:3]
    last = config.stage_grid(config.num_stages - 1)
    kernels = {"tokens": tuple(g // n for g, n in zip(grid, last)), "patches": tuple(config.patch_size[:3])}
    for stage in token_stages:
        if stage > 1:
            kernels[f"tokens-stage-{stage}"] = tuple(g // n for g, n in zip(grid, config.stage_grid(stage - 1)))
    runs, _ = prepared_runs(store, participants)
    out: dict[str, dict[str, np.ndarray]] = {}
    for pid in sorted(runs):
        pooled: dict[str, list[np.ndarray]] = {view: [] for view in kernels}
        for _, x in window_batches(store, run_windows(store, runs[pid], length), length, grid, batch_size,
                                   torch.device("cpu")):
            b, c, *_, t = x.shape
            frames = x.permute(0, 5, 1, 2, 3, 4).reshape(b * t, c, *grid)  # (B x T, C, X, Y, Z)
            for view, kernel in kernels.items():  # -> (B, C, positions, T)
                pooled[view].append(F.avg_pool3d(frames, kernel).reshape(b, t, c, -1).permute(0, 2, 3, 1).numpy())
        if pooled["tokens"]:
            windows = {view: np.concatenate(v) for view, v in pooled.items()}
            out[pid] = {"tokens_lagged": lead_lag(windows["tokens"]),
                        **{view: participant_vector(w, "tokens") for view, w in windows.items()}}
    return out


def lead_lag(series: np.ndarray) -> np.ndarray:
    """(windows, C, positions, T) -> per channel and pair of positions i < j, the antisymmetric part of
    the lag-one cross-covariance within windows, mean over windows: positive when i leads j."""
    x = series - series.mean(axis=(0, 3), keepdims=True)
    lagged = np.einsum("wcit,wcjt->cij", x[..., :-1], x[..., 1:]) / (x.shape[0] * (x.shape[3] - 1))
    upper = np.triu_indices(x.shape[2], k=1)
    return (lagged - lagged.transpose(0, 2, 1))[:, upper[0], upper[1]].ravel()


def compare_to_random(backbones: dict[str, dict]) -> None:
    """Add to each pretrained backbone's entry its mean paired difference to the random ones of the
    same view ("name/stage-N" against "random-S/stage-N"), "minus_random", and whether its mean beats
    every one of them, "above_every_random", per target."""
    def view(name: str) -> str:
        return name.split("/", 1)[1] if "/" in name else ""

    for name, b in backbones.items():
        randoms = [r for n, r in backbones.items() if n.startswith("random-") and view(n) == view(name)]
        if not name.startswith("random-") and randoms:
            b["minus_random"] = {t: round(float(np.mean([np.mean(np.array(s) - np.array(r["scores"][t]))
                                                         for r in randoms])), 3) for t, s in b["scores"].items()}
            b["above_every_random"] = {t: bool(all(np.mean(s) > np.mean(r["scores"][t]) for r in randoms))
                                       for t, s in b["scores"].items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="store of participants the backbones never saw")
    p.add_argument("--model", action="append", default=[], help="NAME=MODEL_DIR of a pretrained backbone (repeat)")
    p.add_argument("--random", type=int, nargs="*", default=[0, 1, 2],
                   help="seeds of random backbones (default 0 1 2; --random alone: none)")
    p.add_argument("--preset", default="demo", help="architecture of the random backbones")
    p.add_argument("--targets", default="amplitude_group,coupling_group,order_group,lowfreq_score")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work", default="probe-heldout-work", help="where the random backbones are written")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", default="auto", help="where the backbones embed (auto: the accelerator if any)")
    p.add_argument("--stages", choices=("last", "all"), default="last",
                   help="all: also probe each stage's token-averaged output (backbone name/stage-N)")
    p.add_argument("--tokens", action="store_true",
                   help="also probe the last stage's per-position statistics and their lead-lag "
                        "(backbone name/tokens, name/tokens_lagged)")
    p.add_argument("--tokens_stage", type=int, nargs="*", default=[],
                   help="also probe these stages' per-position statistics, before their patch merging "
                        "(backbone name/tokens-stage-N; with --input, input/tokens-stage-N too)")
    p.add_argument("--input", action="store_true",
                   help="also probe the same statistics of the model input, no backbone (input/tokens, "
                        "input/tokens_lagged, input/patches), at the first --model's resolutions, else --preset's")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch
    from pretrain_probe import random_model

    from neurox.analysis.embed import load_model
    from neurox.config import SwiFTConfig, preset
    from neurox.data.loader import load_cohort
    from neurox.data.store import Store
    from neurox.hub import read_config
    from neurox.train.distributed import detect

    device = detect(args.device).device
    store = Store(args.store)
    cohort = load_cohort(store, [c.strip() for c in args.targets.split(",") if c.strip()])
    backbones = [tuple(m.split("=", 1)) for m in args.model]
    work = Path(args.work)
    backbones += [(f"random-{s}", str(random_model(work / f"random-{s}", s, args.preset))) for s in args.random]
    result = {"store": str(store.root), "participants": len(cohort.participants), "folds": args.folds,
              "repeats": args.repeats, "torch": torch.__version__, "threads": torch.get_num_threads(), "backbones": {}}
    if args.input:  # the input's statistics at the first named backbone's resolutions, else --preset's
        arch = SwiFTConfig.from_dict(read_config(backbones[0][1])["model"]) if backbones else preset(args.preset)
        backbones.insert(0, ("input", None))
    for name, path in backbones:
        started = time.perf_counter()
        if path is None:
            by_pid = input_statistics(store, cohort.participants, arch, args.batch_size, tuple(args.tokens_stage))
        else:
            model, _ = load_model(path)
            model.to(device).eval()
            by_pid = stage_embeddings(model, store, cohort.participants, args.batch_size,
                                      earlier=args.stages == "all", tokens=args.tokens,
                                      token_stages=tuple(args.tokens_stage))
        views = next(iter(by_pid.values())).keys() if by_pid else []
        embeddings = {("" if v == "last" else f"/{v}"): {pid: f[v] for pid, f in by_pid.items()} for v in views}
        seconds = round(time.perf_counter() - started, 1)
        for suffix, features in embeddings.items():
            who = [pid for pid in cohort.participants if pid in features]
            x = np.stack([features[pid] for pid in who])
            y = np.stack([cohort.labels(pid) for pid in who])
            scores = {t.column: out_of_fold_scores(x, y[:, i], t.task, args.folds, args.repeats)
                      for i, t in enumerate(cohort.targets)}
            result["backbones"][name + suffix] = {
                "path": path, "seconds": seconds, "scores": scores,
                "mean": {t: round(float(np.mean(s)), 3) for t, s in scores.items()},
                "sd": {t: round(float(np.std(s)), 3) for t, s in scores.items()}}
            print(json.dumps({name + suffix: result["backbones"][name + suffix]["mean"]}), file=sys.stderr, flush=True)
    compare_to_random(result["backbones"])
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
