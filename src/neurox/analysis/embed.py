"""``neurox embed``: each window's and each participant's representation in a model.

The embedding of a window is the backbone's output averaged over space and time (what the heads
see); a participant's is the mean over their windows. Tables carry the participant ids, the run
and window start, the split of the run (for a finetune run) and every phenotype column, then
``e0 .. e{C-1}``: TSV, or Parquet when the file name ends in ``.parquet`` (needs pyarrow). A PNG
of the first two principal components, coloured by a chosen column, goes beside the table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from neurox.data.loader import prepared_runs, run_windows, window_batches
from neurox.data.store import Store
from neurox.hub import weights_digest
from neurox.io.atomic import write_atomic
from neurox.io.claim import discard_parts, kept_parts, resolved


def load_model(path: str | Path):
    """A finetune run directory (its ``model/``) or a model directory; (model, splits)."""
    from neurox.hub import load_pretrained

    path = Path(path)
    if (path / "model" / "config.json").is_file():
        from neurox.data.loader import load_splits

        splits = load_splits(path / "splits.tsv") if (path / "splits.tsv").is_file() else {}
        return load_pretrained(path / "model", with_head=False), splits
    return load_pretrained(path, with_head=False), {}  # or one line saying why it is not a model directory


POOLS = ("mean", "mean_std", "tokens")


@torch.no_grad()
def window_embeddings(model, store: Store, run_ids: list[str], batch_size: int = 4, progress: bool = True,
                      over_time: bool = False, per_position: bool = False, stage: int | None = None):
    """(rows of (run_id, start), embeddings) for every non-overlapping window: the backbone's output
    averaged over space and time (windows, C), with ``over_time`` over space only (windows, C, T), with
    ``per_position`` not averaged at all (windows, C, positions, T), the positions in x, y, z order.
    ``stage`` (1-based, default the last): the output of that stage instead, before its patch merging."""
    from neurox.progress import progress as progress_display

    length, grid = model.config.img_size[3], model.config.img_size[:3]
    device = next(model.parameters()).device
    windows = run_windows(store, run_ids, length)
    out = []
    batches = window_batches(store, windows, length, grid, batch_size, device)
    for _, x in progress_display(batches, total=-(-len(windows) // batch_size), desc="embed", unit="batch",
                                 disable=not progress):
        features = model.forward_features(x, stages=stage).float()  # (B, C, X', Y', Z', T')
        if per_position:
            out.append(features.flatten(2, 4).cpu().numpy())
        else:
            spatial = features.mean(dim=(2, 3, 4))  # (B, C, T)
            out.append((spatial if over_time else spatial.mean(-1)).cpu().numpy())
    if not out:
        shape = (1, 1) if per_position else (1,) if over_time else ()
        channels = model.config.stage_dim((stage or model.config.num_stages) - 1)
        return windows, np.zeros((0, channels, *shape), dtype=np.float32)
    return windows, np.concatenate(out)


def participant_vector(series: np.ndarray, pool: str = "mean") -> np.ndarray:
    """One participant's embedding from ``series``, their windows' representation frame by frame:
    (windows, C, T) averaged over space, or (windows, C, positions, T) per position (which ``mean`` and
    ``mean_std`` average over space first). ``mean``: the mean over all frames (C,), what the heads see.
    ``mean_std``: that and each channel's standard deviation over all frames of all windows (2C,),
    the statistics pooling of speaker embeddings: a mean is linear in the features, so it cannot
    show how strongly they fluctuate, which is what BOLD amplitude, coupling and spectral power are.
    ``tokens`` (per-position series only): per channel and position the mean and the standard deviation
    over all frames (2 x C x positions), which also keeps where in the brain a feature fluctuates."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
    if pool == "tokens":
        if series.ndim != 4:
            raise ValueError("pool 'tokens' needs per-position series (windows, C, positions, T)")
        frames = series.transpose(1, 2, 0, 3).reshape(*series.shape[1:3], -1)  # (C, positions, windows x T)
        return np.concatenate([frames.mean(-1).ravel(), frames.std(-1).ravel()])
    if series.ndim == 4:
        series = series.mean(2)
    frames = series.transpose(1, 0, 2).reshape(series.shape[1], -1)  # (C, windows x T)
    if pool == "mean":
        return frames.mean(1)
    return np.concatenate([frames.mean(1), frames.std(1)])


def write_table(path: Path, columns: list[str], rows: list[list]) -> Path:
    """TSV, or Parquet for a ``.parquet`` name; written atomically."""
    if path.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow); or name the file .tsv") \
                from None
        table = pa.table({c: [row[i] for row in rows] for i, c in enumerate(columns)})
        write_atomic(path, lambda tmp: pq.write_table(table, str(tmp)))
        return path
    lines = ["\t".join(columns)] + ["\t".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row)
                                    for row in rows]
    write_atomic(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return path


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first two principal components of the rows, and the fraction of variance each explains."""
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    variance = s**2 / max((s**2).sum(), 1e-12)
    components = centred @ vt[:2].T
    if components.shape[1] < 2:
        components = np.pad(components, ((0, 0), (0, 2 - components.shape[1])))
    return components, variance[:2]


def plot_pca(png: Path, points: np.ndarray, variance: np.ndarray, labels: list[str], column: str | None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    fig, ax = plt.subplots(figsize=(5, 4.2))
    try:
        values = np.array([float(v) for v in labels])
        image = ax.scatter(points[:, 0], points[:, 1], c=values, cmap="viridis", s=18)
        fig.colorbar(image, ax=ax, label=column)
    except ValueError:  # classes, or missing values: one colour per value
        for value in sorted(set(labels)):
            chosen = np.array([v == value for v in labels])
            ax.scatter(points[chosen, 0], points[chosen, 1], s=18, label=f"{column} = {value}" if column else value)
        if column:
            ax.legend(fontsize=8)
    ax.set_xlabel(f"PC1 ({100 * variance[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * (variance[1] if len(variance) > 1 else 0):.0f}% of variance)")
    ax.set_title("participants in the model's representation", fontsize=9)
    fig.tight_layout()
    write_atomic(png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return png


def embed(model_path: str | Path, store_path: str | Path, out: str | Path, color_by: str | None = None,
          batch_size: int = 4, device: str = "auto", progress: bool = True) -> dict[str, Path]:
    """Write ``out`` (one row per participant), ``<out stem>_windows<suffix>`` (one row per window)
    and ``<out stem>_pca.png``; return their paths."""
    from neurox.progress import progress as progress_display
    from neurox.train.distributed import detect
    from neurox.train.runs import check_model_store

    out = Path(out)
    if out.suffix not in (".tsv", ".parquet"):
        raise ValueError(f"{out}: name the output .tsv or .parquet")
    model, splits = load_model(model_path)
    store = Store(store_path)
    check_model_store(model, store)
    table = {row["participant_id"]: row for row in store.phenotypes()}
    phenotype_columns = [c for c in next(iter(table.values()), {}) if c != "participant_id"]
    if color_by and color_by not in phenotype_columns and color_by != "split":
        raise ValueError(f"--color_by {color_by!r}: not a column of {store.root / 'participants.tsv'} (nor 'split')")
    model.to(detect(device).device).eval()
    runs, _ = prepared_runs(store)
    cache = kept_parts(out, {"model": weights_digest(model_path), "store": resolved(store.root)})
    windows, vectors = [], []
    bar = progress_display(total=len(runs), desc="embed", unit="participant", disable=not progress)
    for pid in sorted(runs):
        kept = cache / f"{pid}.npz"
        try:
            if kept.is_file():  # embedded by an earlier, interrupted run of the same model on the same store
                with np.load(kept) as done:
                    rows, emb = list(zip(done["run_ids"].tolist(), done["starts"].tolist())), done["embeddings"]
            else:
                rows, emb = window_embeddings(model, store, runs[pid], batch_size, progress=False)
                write_atomic(kept, lambda tmp, rows=rows, emb=emb: _save_participant(tmp, rows, emb))
        except (OSError, ValueError, KeyError) as err:
            bar.write(f"neurox embed: {pid}: {err}; left out")
            continue
        finally:
            bar.update(1)
        windows += [(pid, r, s) for r, s in rows]
        vectors.append(emb)
        bar.set_postfix(windows=len(windows))
    bar.close()
    if not windows:
        raise ValueError(f"{store.root}: no window could be embedded")
    vectors = np.concatenate(vectors)
    dims = [f"e{i}" for i in range(vectors.shape[1])]

    def info(pid: str) -> list:
        return [splits.get(pid, "external" if splits else "")] + [table.get(pid, {}).get(c, "") for c in
                                                                    phenotype_columns]

    window_rows = [[pid, r, s, *info(pid), *map(float, v)] for (pid, r, s), v in zip(windows, vectors)]
    window_path = out.with_name(out.name.removesuffix(out.suffix) + "_windows" + out.suffix)
    write_table(window_path, ["participant_id", "run_id", "start", "split", *phenotype_columns, *dims], window_rows)
    participants = sorted({w[0] for w in windows})
    who = np.array([w[0] for w in windows])
    means = np.stack([vectors[who == p].mean(0) for p in participants])
    write_table(out, ["participant_id", "n_windows", "split", *phenotype_columns, *dims],
                [[p, int((who == p).sum()), *info(p), *map(float, m)] for p, m in zip(participants, means)])
    points, variance = pca_2d(means)
    labels = [(info(p)[0] if color_by == "split" else table.get(p, {}).get(color_by, "")) if color_by else "all"
              for p in participants]
    png = plot_pca(out.with_name(out.name.removesuffix(out.suffix) + "_pca.png"), points, variance, labels, color_by)
    discard_parts(out)
    return {"participants": out, "windows": window_path, **({"pca": png} if png else {})}


def _save_participant(path: Path, rows: list, embeddings: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, run_ids=np.array([r for r, _ in rows]), starts=np.array([s for _, s in rows]),
                 embeddings=embeddings)
