"""SwiFT: the Swin 4D fMRI Transformer (Kim et al., NeurIPS 2023), faithful to the published model.

Input and output follow the published layout, ``(B, C, X, Y, Z, T)``; inside, tokens are a flat
token-major sequence ``(L, B, C)`` kept in the window order of the block that runs next (see
``attention.py``): token-major so that attention's q, k, v and output are views, not copies.
Parameter names are the published ones, so a published state dict loads as is.

Order of this file: helpers, blocks, stage, model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neurox.config import SwiFTConfig
from neurox.models.attention import StagePlan, WindowAttention, permute_tokens

# --- helpers ---------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((1, x.shape[1], 1)).bernoulli_(1.0 - self.p)  # tokens (L, B, C)
        return x * keep / (1.0 - self.p)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.linear2(self.drop(F.gelu(self.linear1(x)))))


class PatchEmbed(nn.Module):
    """Linear embedding of each (sx, sy, sz, st) patch: the published flattening order
    (sx, sy, sz, st, C), which equals a per-frame Conv3d with kernel = stride = patch."""

    def __init__(self, patch_size, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        sx, sy, sz, st = self.patch_size
        self.fc = nn.Linear(in_chans * sx * sy * sz * st, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z, T) -> (X', Y', Z', T', B, E)"""
        b, c, x_, y_, z_, t_ = x.shape
        sx, sy, sz, st = self.patch_size
        x = x.view(b, c, x_ // sx, sx, y_ // sy, sy, z_ // sz, sz, t_ // st, st)
        x = x.permute(2, 4, 6, 8, 0, 3, 5, 7, 9, 1).reshape(x_ // sx, y_ // sy, z_ // sz, t_ // st, b, -1)
        return self.fc(x)


class PositionalEmbedding(nn.Module):
    """Learned absolute position: a spatial part and a temporal part, stored in the published
    layout ``(1, C, X, Y, Z, 1)`` and ``(1, C, 1, 1, 1, T)``; the temporal part is cut to the
    input's length, so shorter windows than the model's are allowed."""

    def __init__(self, dim: int, grid):
        super().__init__()
        x, y, z, t = grid
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, x, y, z, 1))
        self.time_embed = nn.Parameter(torch.zeros(1, dim, 1, 1, 1, t))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.time_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (X, Y, Z, T, B, C)."""
        t = x.shape[3]
        x = x + self.pos_embed.permute(2, 3, 4, 5, 0, 1)
        return x + self.time_embed[..., :t].permute(2, 3, 4, 5, 0, 1)


# --- blocks ----------------------------------------------------------------------------------


class SwinBlock(nn.Module):
    """Pre-norm transformer block on tokens in window order; whether it is shifted is decided by
    the order the stage hands it its tokens in, and by the mask."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = WindowAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, num_windows: int, mask: torch.Tensor | None):
        x = x + self.drop_path(self.attn(self.norm1(x), num_windows, mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Halve space (never time): 8 neighbours concatenated, LayerNorm(8C), Linear(8C -> mC)."""

    def __init__(self, dim: int, c_multiplier: int):
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim, eps=1e-5)
        self.reduction = nn.Linear(8 * dim, c_multiplier * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (L, B, C) already gathered in merge order -> (L / 8, B, mC)."""
        length, b, c = x.shape
        x = x.view(length // 8, 8, b, c).transpose(1, 2).reshape(length // 8, b, 8 * c)  # a view when B = 1
        return self.reduction(self.norm(x))


# --- stage -----------------------------------------------------------------------------------


class Stage(nn.Module):
    """One resolution of the hierarchy: ``depth`` blocks, alternately unshifted and shifted
    (never shifted under last-stage full attention), then patch merging unless last."""

    def __init__(self, config: SwiFTConfig, index: int, drop_path: list[float]):
        super().__init__()
        dim = config.stage_dim(index)
        self.window = config.stage_window(index)
        self.full_attention = config.last_layer_full_msa and index == config.num_stages - 1
        self.blocks = nn.ModuleList(
            SwinBlock(dim, config.num_heads[index], config.mlp_ratio, config.qkv_bias, config.drop_rate,
                      config.attn_drop_rate, p)
            for p in drop_path
        )
        last = index == config.num_stages - 1
        self.downsample = None if last else PatchMerging(dim, config.c_multiplier)
        self.grad_checkpointing = False
        self._plans: dict = {}

    def plan(self, grid, device) -> StagePlan:
        key = (tuple(grid), device)
        plan = self._plans.get(key)
        if plan is None:
            plan = StagePlan.build(grid, self.window, len(self.blocks), not self.full_attention,
                                   self.downsample is not None, device)
            self._plans[key] = plan
        return plan

    def forward(self, x: torch.Tensor, grid, merge: bool = True) -> torch.Tensor:
        """x: (L, B, C) in grid order -> (L', B, C') in the next stage's grid order; with ``merge``
        False, (L, B, C) in this stage's grid order (the stage's own output, before patch merging)."""
        plan = self.plan(grid, x.device)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        for b, block in enumerate(self.blocks):
            x = permute_tokens(x, plan.steps[b])
            args = (x, plan.num_windows[b], plan.mask(b, dtype))
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        if self.downsample is None or not merge:
            return permute_tokens(x, plan.grid_exit)
        return self.downsample(permute_tokens(x, plan.exit))


# --- model -----------------------------------------------------------------------------------


class SwiFT(nn.Module):
    """The SwiFT backbone with an optional head.

    ``forward_features(x)``: (B, C, X, Y, Z, T) -> (B, C_last, X', Y', Z', T);
    ``forward_head(features)``: the head's output (pooled features when there is no head);
    ``forward(x)``: both.
    """

    def __init__(self, config: SwiFTConfig, head: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim)
        self.pos_drop = nn.Dropout(config.drop_rate)
        self.pos_embeds = nn.ModuleList(
            PositionalEmbedding(config.stage_dim(i), config.stage_grid(i)) for i in range(config.num_stages)
        )
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths)).tolist()
        starts = [sum(config.depths[:i]) for i in range(config.num_stages)]
        self.layers = nn.ModuleList(
            Stage(config, i, rates[s : s + d]) for i, (s, d) in enumerate(zip(starts, config.depths))
        )
        self.num_features = config.num_features
        self.head = head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 6:
            raise ValueError(f"expected input (B, C, X, Y, Z, T), got shape {tuple(x.shape)}")
        _, c, *space, t = x.shape
        if c != cfg.in_chans or tuple(space) != cfg.img_size[:3]:
            raise ValueError(
                f"input {tuple(x.shape)} does not match the model: channels {cfg.in_chans}, "
                f"space {cfg.img_size[:3]}"
            )
        if t > cfg.img_size[3] or t % cfg.patch_size[3]:
            raise ValueError(
                f"input has {t} frames; the model takes at most {cfg.img_size[3]} (its temporal embedding), "
                f"in multiples of the temporal patch {cfg.patch_size[3]}"
            )

    def forward_features(self, x: torch.Tensor, hidden: torch.Tensor | None = None,
                         mask_token: torch.Tensor | None = None, stages: int | None = None) -> torch.Tensor:
        """``hidden`` (B, X', Y', Z', T') bool marks patch tokens replaced by ``mask_token`` (C,)
        before the position embedding: masked image modelling. ``stages``: run only the first
        ``stages`` stages and return the last one's output before its patch merging, (B, C_k, X_k,
        Y_k, Z_k, T), a finer representation than the last stage's (what a probe of local effects reads)."""
        self.check_input(x)
        b = x.shape[0]
        x = self.patch_embed(x)  # (X, Y, Z, T, B, C)
        if hidden is not None:
            x = torch.where(hidden.permute(1, 2, 3, 4, 0)[..., None], mask_token.to(x.dtype), x)
        x = self.pos_drop(x)
        grid = list(x.shape[:4])
        stages = self.config.num_stages if stages is None else stages
        if not 1 <= stages <= self.config.num_stages:
            raise ValueError(f"stages must be 1 to {self.config.num_stages}, not {stages}")
        for i, stage in enumerate(self.layers[:stages]):
            if i > 0:
                grid = [grid[0] // 2, grid[1] // 2, grid[2] // 2, grid[3]]
                x = x.view(*grid, b, -1)
            x = self.pos_embeds[i](x)
            x = stage(x.view(-1, b, x.shape[-1]), grid, merge=i < stages - 1)
        return x.view(*grid, b, -1).permute(4, 5, 0, 1, 2, 3)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return features.mean(dim=(2, 3, 4, 5))
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
