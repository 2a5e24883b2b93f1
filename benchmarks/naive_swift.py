"""The SwiFT forward computed the way the published code computes it, on a neurox model's weights.

Used as the "naive path" of ``benchmarks/backbone.py`` and cross-checked against the published
fixtures in the tests, so that the benchmark compares the same arithmetic done two ways:
channels-first between stages, every block rolls, partitions into windows, attends with a plain
``softmax(q k^T + mask) v``, reverses the partition and rolls back, and the region mask is rebuilt
on every forward.
"""

from __future__ import annotations

import torch

from neurox.config import clamp_window
from neurox.models.swift import SwiFT


def window_partition(x, w):
    b, d, h, wd, t, c = x.shape
    x = x.view(b, d // w[0], w[0], h // w[1], w[1], wd // w[2], w[2], t // w[3], w[3], c)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6, 8, 9).contiguous().view(-1, w[0] * w[1] * w[2] * w[3], c)


def window_reverse(windows, w, dims):
    b, d, h, wd, t = dims
    x = windows.view(b, d // w[0], h // w[1], wd // w[2], t // w[3], w[0], w[1], w[2], w[3], -1)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4, 8, 9).contiguous().view(b, d, h, wd, t, -1)


def compute_mask(dims, w, s, device):
    img_mask = torch.zeros((1, *dims, 1), device=device)
    cnt = 0
    for d in (slice(-w[0]), slice(-w[0], -s[0]), slice(-s[0], None)):
        for h in (slice(-w[1]), slice(-w[1], -s[1]), slice(-s[1], None)):
            for wd in (slice(-w[2]), slice(-w[2], -s[2]), slice(-s[2], None)):
                for t in (slice(-w[3]), slice(-w[3], -s[3]), slice(-s[3], None)):
                    img_mask[:, d, h, wd, t, :] = cnt
                    cnt += 1
    windows = window_partition(img_mask, w).squeeze(-1)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def attention(attn, x, mask):
    b_, n, c = x.shape
    h = attn.num_heads
    qkv = attn.qkv(x).reshape(b_, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * attn.head_dim**-0.5, qkv[1], qkv[2]
    scores = q @ k.transpose(-2, -1)
    if mask is not None:
        nw = mask.shape[0]
        scores = scores.view(b_ // nw, nw, h, n, n) + mask.to(scores.dtype).unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, h, n, n)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b_, n, c)
    return attn.proj(out)


def block_forward(block, x, window, shift, mask):
    b, d, h, w, t, c = x.shape
    shortcut = x
    x = block.norm1(x)
    if any(shift):
        x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3, 4))
    windows = attention(block.attn, window_partition(x, window), mask if any(shift) else None)
    x = window_reverse(windows.view(-1, *window, c), window, (b, d, h, w, t))
    if any(shift):
        x = torch.roll(x, shifts=tuple(shift), dims=(1, 2, 3, 4))
    x = shortcut + x
    return x + block.mlp(block.norm2(x))


def stage_forward(stage, x):
    b, c, d, h, w, t = x.shape
    window, shiftable = clamp_window((d, h, w, t), stage.window)
    half = tuple(wi // 2 if ok else 0 for wi, ok in zip(window, shiftable))
    x = x.permute(0, 2, 3, 4, 5, 1).contiguous()
    mask = None if stage.full_attention else compute_mask((d, h, w, t), window, half, x.device)
    for i, block in enumerate(stage.blocks):
        shift = half if (i % 2 == 1 and not stage.full_attention) else (0, 0, 0, 0)
        x = block_forward(block, x, window, shift, mask)
    if stage.downsample is not None:
        x = torch.cat([x[:, i::2, j::2, k::2] for i in range(2) for j in range(2) for k in range(2)], -1)
        x = stage.downsample.reduction(stage.downsample.norm(x))
    return x.permute(0, 5, 1, 2, 3, 4).contiguous()


def naive_forward_features(model: SwiFT, x: torch.Tensor) -> torch.Tensor:
    """(B, C, X, Y, Z, T) -> (B, C_last, X', Y', Z', T), published style."""
    emb = model.patch_embed
    b, c, x_, y_, z_, t_ = x.shape
    sx, sy, sz, st = emb.patch_size
    x = x.view(b, c, x_ // sx, sx, y_ // sy, sy, z_ // sz, sz, t_ // st, st)
    x = x.permute(0, 2, 4, 6, 8, 3, 5, 7, 9, 1).contiguous().view(-1, sx * sy * sz * st * c)
    x = emb.fc(x).view(b, x_ // sx, y_ // sy, z_ // sz, t_ // st, -1).permute(0, 5, 1, 2, 3, 4)
    for pos, stage in zip(model.pos_embeds, model.layers):
        x = x + pos.pos_embed
        x = x + pos.time_embed[..., : x.shape[-1]]
        x = stage_forward(stage, x.contiguous())
    return x


def naive_forward(model: SwiFT, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(naive_forward_features(model, x))

