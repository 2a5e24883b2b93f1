"""Heads on top of backbone features ``(B, C, X, Y, Z, T)``.

Every head starts by averaging over all space-time tokens, as the published SwiFT heads do. The
task (binary, multiclass, regression, contrastive) decides the output size and, in training, the
loss; it is recorded in the model directory so that a loaded model knows what its outputs mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("binary", "multilabel", "multiclass", "regression", "contrastive")


class PooledLinearHead(nn.Module):
    """Mean over tokens, optional hidden linear layer, linear output.

    ``hidden_dim`` reproduces the published ``clf_mlp_v2`` head (two linear layers with nothing in
    between); without it this is the published ``clf_mlp`` (``Linear(C, outputs)``).
    """

    def __init__(self, in_features: int, num_outputs: int, hidden_dim: int | None = None,
                 task: str | None = None, standardize: bool = False):
        super().__init__()
        self.task = task
        self.standardize = standardize
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
        return {"task": self.task, "num_outputs": self.head.out_features,
                "hidden_dim": None if self.hidden is None else self.hidden.out_features,
                "standardize": self.standardize}

    @torch.no_grad()
    def calibrate(self, pooled: torch.Tensor) -> None:
        """Standardise with these pooled features' per-channel mean and std (a linear probe on a frozen
        backbone: its features differ between participants by a small fraction of their size, which a
        linear layer trained on raw features finds slowly, if at all; MAE's probe uses a BatchNorm alike)."""
        self.feature_mean.copy_(pooled.mean(0))
        self.feature_std.copy_(pooled.std(0).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.flatten(2).mean(-1)
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
               standardize: bool = False) -> nn.Module:
    """A head for ``task``: binary -> 1 logit; multilabel -> one logit per binary target;
    multiclass -> ``num_outputs`` logits (>= 3 classes);
    regression -> ``num_outputs`` targets; contrastive -> a ``num_outputs``-dim unit embedding."""
    if task == "binary":
        if num_outputs != 1:
            raise ValueError("a binary head has one output (a logit); use task 'multiclass' for more classes")
        return PooledLinearHead(in_features, 1, hidden_dim, task, standardize)
    if task == "multilabel":  # several binary targets, one logit each
        return PooledLinearHead(in_features, num_outputs, hidden_dim, task, standardize)
    if task == "multiclass":
        if num_outputs < 3:
            raise ValueError(f"a multiclass head needs at least 3 classes, got {num_outputs}; use 'binary'")
        return PooledLinearHead(in_features, num_outputs, hidden_dim, task, standardize)
    if task == "regression":
        if num_outputs < 1:
            raise ValueError("a regression head needs at least one target")
        return PooledLinearHead(in_features, num_outputs, hidden_dim, task, standardize)
    if task == "contrastive":
        return ContrastiveProjection(in_features, num_outputs, hidden_dim)
    if task is None:  # a converted head whose task its checkpoint did not record (or a mixed one)
        return PooledLinearHead(in_features, num_outputs, hidden_dim, None, standardize)
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
