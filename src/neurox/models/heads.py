"""Heads on top of backbone features ``(B, C, X, Y, Z, T)``.

By default a head starts by averaging over all space-time tokens, as the published SwiFT heads do;
a linear head can instead read statistics pooling (``mean_std``) or each last-stage position's own
statistics (``tokens``), the readouts of ``neurox probe --pool``. The task (binary, multiclass,
regression, contrastive) decides the output size and, in training, the loss; task and pooling are
recorded in the model directory so that a loaded model knows what its outputs mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("binary", "multilabel", "multiclass", "regression", "contrastive")
HEAD_POOLS = ("mean", "mean_std", "tokens")


def pool_features(features: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, C, X, Y, Z, T) -> (B, F), as ``neurox probe --pool`` summarises a participant, here per window.
    ``mean``: each channel's mean over all tokens (C). ``mean_std``: each channel's spatial mean, then its
    mean and standard deviation over the frames (2C): a mean is linear in the features and cannot show how
    strongly they fluctuate. ``tokens``: per channel and position the mean and standard deviation over the
    frames (2 x C x positions), which also keeps where a feature fluctuates."""
    if pool == "mean":
        return features.flatten(2).mean(-1)
    if pool == "mean_std":
        series = features.flatten(2, 4).mean(2)  # (B, C, T)
        return torch.cat([series.mean(-1), series.std(-1, correction=0)], 1)
    if pool == "tokens":
        return torch.cat([features.mean(-1).flatten(1), features.std(-1, correction=0).flatten(1)], 1)
    raise ValueError(f"unknown head pool {pool!r}; choose one of {', '.join(HEAD_POOLS)}")


def pooled_width(pool: str, channels: int, positions: int = 1) -> int:
    """How many features ``pool_features`` gives for ``channels`` channels at ``positions`` positions."""
    return {"mean": channels, "mean_std": 2 * channels, "tokens": 2 * channels * positions}[pool]


class PooledLinearHead(nn.Module):
    """Pooled features (the mean over tokens unless ``pool`` says otherwise), optional hidden linear
    layer, linear output.

    ``hidden_dim`` reproduces the published ``clf_mlp_v2`` head (two linear layers with nothing in
    between); without it this is the published ``clf_mlp`` (``Linear(C, outputs)``).
    """

    def __init__(self, in_features: int, num_outputs: int, hidden_dim: int | None = None,
                 task: str | None = None, standardize: bool = False, pool: str = "mean", positions: int = 1):
        super().__init__()
        if pool not in HEAD_POOLS:
            raise ValueError(f"unknown head pool {pool!r}; choose one of {', '.join(HEAD_POOLS)}")
        self.task = task
        self.standardize = standardize
        self.pool, self.positions = pool, positions  # positions: of the last stage, for pool "tokens"
        in_features = pooled_width(pool, in_features, positions)
        if standardize:  # fixed statistics of the pooled features, set by ``calibrate``
            self.register_buffer("feature_mean", torch.zeros(in_features))
            self.register_buffer("feature_std", torch.ones(in_features))
        # While the backbone trains under a standardised head (fine-tuning from a linear probe), the
        # features move under fixed statistics; in training, standardise with the batch's own instead
        # (BatchNorm without the running average: fine-tuning recomputes the statistics before every
        # evaluation). Not saved: it concerns training only.
        self.batch_statistics = False
        self.hidden = nn.Linear(in_features, hidden_dim) if hidden_dim else None
        self.head = nn.Linear(hidden_dim or in_features, num_outputs)

    def spec(self) -> dict:
        """What a model directory records to rebuild this head."""
        spec = {"task": self.task, "num_outputs": self.head.out_features,
                "hidden_dim": None if self.hidden is None else self.hidden.out_features,
                "standardize": self.standardize}
        if self.pool != "mean":  # recorded only where it differs, so earlier model directories read the same
            spec.update(pool=self.pool, positions=self.positions)
        return spec

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """The features this head's linear layers read, before standardisation: ``pool_features``."""
        x = pool_features(features, self.pool)
        if x.shape[1] != self.feature_count:
            raise ValueError(f"this head reads {self.feature_count} pooled features ({self.pool} of "
                             f"{self.positions} last-stage positions) but the input gives {x.shape[1]}: a "
                             "different input grid than the one it was trained on")
        return x

    @property
    def feature_count(self) -> int:
        return (self.hidden or self.head).in_features

    @torch.no_grad()
    def calibrate(self, pooled: torch.Tensor) -> None:
        """Standardise with these pooled features' per-channel mean and std (a linear probe on a frozen
        backbone: its features differ between participants by a small fraction of their size, which a
        linear layer trained on raw features finds slowly, if at all; MAE's probe uses a BatchNorm alike)."""
        self.feature_mean.copy_(pooled.mean(0))
        self.feature_std.copy_(pooled.std(0).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.pooled(features)
        if self.standardize:
            if self.training and self.batch_statistics and x.shape[0] > 1:
                x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
            else:
                x = (x - self.feature_mean) / self.feature_std
        if self.hidden is not None:
            x = self.hidden(x)
        return self.head(x)


class ContrastiveProjection(nn.Module):
    """Mean over tokens, then a two-layer MLP; outputs are L2-normalised for cosine similarity."""

    task = "contrastive"

    def __init__(self, in_features: int, out_dim: int = 128, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or in_features
        self.hidden = nn.Linear(in_features, hidden_dim)
        self.head = nn.Linear(hidden_dim, out_dim)

    def spec(self) -> dict:
        return {"task": self.task, "num_outputs": self.head.out_features, "hidden_dim": self.hidden.out_features}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.head(F.relu(self.hidden(features.flatten(2).mean(-1))))
        return F.normalize(x, dim=-1)


def build_head(task: str | None, in_features: int, num_outputs: int = 1, hidden_dim: int | None = None,
               standardize: bool = False, pool: str = "mean", positions: int = 1) -> nn.Module:
    """A head for ``task``: binary -> 1 logit; multilabel -> one logit per binary target;
    multiclass -> ``num_outputs`` logits (>= 3 classes);
    regression -> ``num_outputs`` targets; contrastive -> a ``num_outputs``-dim unit embedding.
    ``in_features``: the backbone's channels; ``pool``, ``positions``: see ``pool_features``."""
    if task == "binary":
        if num_outputs != 1:
            raise ValueError("a binary head has one output (a logit); use task 'multiclass' for more classes")
        return PooledLinearHead(in_features, 1, hidden_dim, task, standardize, pool, positions)
    if task == "multilabel":  # several binary targets, one logit each
        return PooledLinearHead(in_features, num_outputs, hidden_dim, task, standardize, pool, positions)
    if task == "multiclass":
        if num_outputs < 3:
            raise ValueError(f"a multiclass head needs at least 3 classes, got {num_outputs}; use 'binary'")
        return PooledLinearHead(in_features, num_outputs, hidden_dim, task, standardize, pool, positions)
    if task == "regression":
        if num_outputs < 1:
            raise ValueError("a regression head needs at least one target")
        return PooledLinearHead(in_features, num_outputs, hidden_dim, task, standardize, pool, positions)
    if task == "contrastive":
        if pool != "mean":
            raise ValueError("a contrastive projection reads the mean over all tokens (pool 'mean')")
        return ContrastiveProjection(in_features, num_outputs, hidden_dim)
    if task is None:  # a converted head whose task its checkpoint did not record (or a mixed one)
        return PooledLinearHead(in_features, num_outputs, hidden_dim, None, standardize, pool, positions)
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
