"""Shifted-window attention equals brute-force attention over the whole grid with an explicit
region mask, built here independently from token coordinates."""

from __future__ import annotations

import itertools

import pytest
import torch

from neurox.config import clamp_window
from neurox.models.attention import (
    MASK_VALUE,
    StagePlan,
    WindowAttention,
    permute_tokens,
    window_attention_mask,
    window_order,
)


def brute_force_attention(attn: WindowAttention, x: torch.Tensor, grid, window, shift) -> torch.Tensor:
    """x: (L, B, C) in grid order. Token a may see token b iff, after rolling the grid by -shift,
    they fall in the same window; they are additionally masked (-100) iff they came from different
    regions of the roll (opposite ends of the grid brought together)."""
    coords = torch.tensor(list(itertools.product(*[range(n) for n in grid])))  # (L, 4), grid order
    n = torch.tensor(grid)
    rolled = (coords - torch.tensor(shift)) % n
    win = rolled // torch.tensor(window)
    same_window = (win[:, None, :] == win[None, :, :]).all(-1)
    # region along an axis of the rolled grid: [0, n-w), [n-w, n-s), [n-s, n); one region if s = 0
    regions = []
    for axis, (size, w, s) in enumerate(zip(grid, window, shift)):
        p = rolled[:, axis]
        regions.append(torch.zeros_like(p) if s == 0 else (p >= size - w).long() + (p >= size - s).long())
    region = torch.stack(regions, -1)
    same_region = (region[:, None, :] == region[None, :, :]).all(-1)
    bias = torch.full(same_window.shape, float("-inf"))
    bias[same_window] = 0.0
    bias[same_window & ~same_region] = MASK_VALUE

    length, b, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).view(length, b, 3, h, d).permute(2, 1, 3, 0, 4)  # each (B, H, L, D)
    scores = (q @ k.transpose(-1, -2)) * d**-0.5 + bias
    out = (scores.softmax(-1) @ v).permute(2, 0, 1, 3).reshape(length, b, c)
    return attn.proj(out)


CASES = [
    # grid, configured window, shifted
    ((4, 4, 4, 4), (2, 2, 2, 2), False),
    ((4, 4, 4, 4), (2, 2, 2, 2), True),
    ((4, 4, 2, 6), (2, 2, 2, 3), True),  # z clamped (grid == window): no shift on z
    ((2, 4, 4, 4), (4, 2, 2, 2), True),  # x clamped (grid < window): window becomes the grid
    ((6, 4, 4, 2), (3, 4, 2, 2), True),  # odd window, y spanned whole
]


@pytest.mark.parametrize("grid,window,shifted", CASES)
@pytest.mark.parametrize("pad_head_dim", [False, True])
def test_window_attention_equals_brute_force(grid, window, shifted, pad_head_dim):
    used, shiftable = clamp_window(grid, window)
    shift = tuple(w // 2 if (ok and shifted) else 0 for w, ok in zip(used, shiftable))
    attn = WindowAttention(dim=12, num_heads=2).eval()
    attn.pad_head_dim = pad_head_dim  # head dim 6 -> 8 with zero padding must be exact
    batch = 2
    x = torch.randn(grid[0] * grid[1] * grid[2] * grid[3], batch, 12)
    # large logits make the -100 mask matter: a masked pair would otherwise win the softmax
    attn.qkv.weight.data *= 3.0

    order = window_order(grid, used, shift)
    num_windows = order.numel() // (used[0] * used[1] * used[2] * used[3])
    windowed = attn(x[order], num_windows, window_attention_mask(grid, used, shift))
    result = torch.empty_like(windowed)
    result[order] = windowed

    expected = brute_force_attention(attn, x, grid, used, shift)
    assert torch.allclose(result, expected, atol=1e-5, rtol=1e-5)
    if any(shift):  # the mask is not a no-op: without it the answer differs
        unmasked = attn(x[order], num_windows, None)
        assert not torch.allclose(unmasked, windowed, atol=1e-3)


def test_stage_plan_steps_compose_to_each_block_order():
    grid, window = (4, 4, 4, 4), (2, 2, 2, 2)
    plan = StagePlan.build(grid, window, depth=4, shift_blocks=True, merge=True, device="cpu")
    x = torch.arange(256.0).view(256, 1, 1)
    for block in range(4):
        x = permute_tokens(x, plan.steps[block])
        shift = (1, 1, 1, 1) if block % 2 else (0, 0, 0, 0)
        assert torch.equal(x.flatten().long(), window_order(grid, window, shift))
    x = permute_tokens(x, plan.exit).flatten().long()
    # merge order: each group of 8 is the 2x2x2 spatial neighbourhood of one merged token
    first = x[:8].tolist()
    assert first == [0, 4, 16, 20, 64, 68, 80, 84]  # (i, j, k) offsets in product order, t = 0


def test_mask_is_built_once_per_grid_and_cached():
    from neurox.config import SwiFTConfig
    from neurox.models import SwiFT

    config = SwiFTConfig(img_size=(24, 24, 24, 4), embed_dim=12, depths=(2, 2), num_heads=(3, 3),
                         window_size=(2, 2, 2, 2), first_window_size=(2, 2, 2, 2))
    model = SwiFT(config).eval()
    with torch.no_grad():
        model(torch.randn(1, 1, 24, 24, 24, 4))
        plans = [dict(stage._plans) for stage in model.layers]
        model(torch.randn(2, 1, 24, 24, 24, 4))  # another batch size reuses the same plan
        model(torch.randn(1, 1, 24, 24, 24, 2))  # a shorter window gets its own
    for before, stage in zip(plans, model.layers):
        (key,) = before
        assert stage._plans[key] is before[key]
        assert len(stage._plans) == 2
