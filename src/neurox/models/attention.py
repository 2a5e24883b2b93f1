"""4D (shifted) window attention without the copies.

The published SwiFT rolls the token grid, partitions it into windows, attends, reverses the
partition and rolls back in every block: four full copies of the activations, plus a region mask
rebuilt on every forward. Here a window tiling is a *permutation* of the flat token grid: the
residual stream is kept in the window order of the block that runs next, and moving from one
block's order to the next (or to the patch-merging order at the end of a stage) is one gather with
a precomputed index. LayerNorm, MLP and residual additions are per token, so they do not care
which order the tokens are in. Indices and masks are built once per grid shape and cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from neurox.config import clamp_window

MASK_VALUE = -100.0  # the published additive mask value (not -inf): kept for exact parity


# --- index geometry --------------------------------------------------------------------------


def window_order(grid, window, shift) -> torch.Tensor:
    """Flat grid index of the token at each position of the window-ordered sequence.

    Position ``k`` enumerates windows (row-major over X, Y, Z, T) and then tokens inside a window;
    the grid is first rolled by ``-shift`` as in Swin, so window-ordered token ``k`` is grid token
    ``order[k]``.
    """
    coords = []
    for n, w, s in zip(grid, window, shift):
        p = torch.arange(n)
        # position p of the rolled axis holds grid coordinate (p + s) mod n; split p = b * w + i
        coords.append(((p + s) % n).view(n // w, w))
    x, y, z, t = coords
    _, ny, nz, nt = grid
    # (wx, ix), (wy, iy), ... -> order (wx, wy, wz, wt, ix, iy, iz, it)
    flat = (
        x[:, None, None, None, :, None, None, None] * (ny * nz * nt)
        + y[None, :, None, None, None, :, None, None] * (nz * nt)
        + z[None, None, :, None, None, None, :, None] * nt
        + t[None, None, None, :, None, None, None, :]
    )
    return flat.reshape(-1)


def merge_order(grid) -> torch.Tensor:
    """Flat grid index of each token in the order patch merging reads them: for every merged
    token (x, y, z, t), its 8 sources ``(2x+i, 2y+j, 2z+k, t)`` in ``product(range(2), repeat=3)``
    order, so that viewing the gathered tokens as ``(L / 8, 8 C)`` is the published concatenation.
    """
    nx, ny, nz, nt = grid
    idx = torch.arange(nx * ny * nz * nt).view(nx // 2, 2, ny // 2, 2, nz // 2, 2, nt)
    return idx.permute(0, 2, 4, 6, 1, 3, 5).reshape(-1)


def region_labels(grid, window, shift) -> torch.Tensor:
    """Region label of every token of the rolled grid, as the published ``compute_mask``: along an
    axis with shift s the positions [0, n-w), [n-w, n-s), [n-s, n) are three regions (tokens
    that the roll brought together from opposite ends must not attend to each other)."""
    labels = torch.zeros(grid, dtype=torch.long)
    for axis, (n, w, s) in enumerate(zip(grid, window, shift)):
        p = torch.arange(n)
        axis_label = torch.zeros(n, dtype=torch.long) if s == 0 else (p >= n - w).long() + (p >= n - s).long()
        shape = [1, 1, 1, 1]
        shape[axis] = n
        labels = labels * 3 + axis_label.view(shape)
    return labels


def window_attention_mask(grid, window, shift) -> torch.Tensor | None:
    """Additive mask ``(num_windows, 1, N, N)`` for a shifted tiling, None for an unshifted one."""
    if not any(shift):
        return None
    # labels of the rolled grid, partitioned like the tokens (no roll: labels are of rolled positions)
    rolled = region_labels(grid, window, shift).reshape(-1)
    windows = rolled[window_order(grid, window, (0, 0, 0, 0))]
    n = 1
    for w in window:
        n *= w
    windows = windows.view(-1, n)
    different = windows[:, :, None] != windows[:, None, :]
    return torch.zeros(different.shape).masked_fill_(different, MASK_VALUE).unsqueeze(1)


def inverse_permutation(index: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel(), device=index.device)
    return inverse


class _PermuteTokens(torch.autograd.Function):
    """Gather along the token axis whose backward is the inverse gather (a permutation needs no
    scatter-add, which is much slower on CPU)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_tokens(x: torch.Tensor, step: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Reorder the tokens of ``x`` (L, B, C) by an (index, inverse) pair; None means identity."""
    if step is None:
        return x
    return _PermuteTokens.apply(x, *step)


@dataclass
class StagePlan:
    """Everything a stage needs for one grid shape: the gather into each block's window order,
    the gather out of the stage (to patch-merging order, or back to grid order), and the masks."""

    num_windows: list[int]
    steps: list[tuple[torch.Tensor, torch.Tensor] | None]  # into block b's order, from the previous
    exit: tuple[torch.Tensor, torch.Tensor] | None
    grid_exit: tuple[torch.Tensor, torch.Tensor] | None  # out of the stage to grid order, merging or not
    masks: list[torch.Tensor | None]
    _cast_masks: dict = field(default_factory=dict)

    @classmethod
    def build(cls, grid, window, depth, shift_blocks: bool, merge: bool, device) -> StagePlan:
        window, shiftable = clamp_window(grid, window)
        half = tuple(w // 2 if ok else 0 for w, ok in zip(window, shiftable))
        identity = torch.arange(grid[0] * grid[1] * grid[2] * grid[3])
        previous = identity
        steps, masks, num_windows = [], [], []
        for b in range(depth):
            shift = half if (shift_blocks and b % 2 == 1) else (0, 0, 0, 0)
            order = window_order(grid, window, shift)
            steps.append(_step(previous, order, device))
            mask = window_attention_mask(grid, window, shift)
            masks.append(None if mask is None else mask.to(device))
            num_windows.append(order.numel() // (window[0] * window[1] * window[2] * window[3]))
            previous = order
        grid_exit = _step(previous, identity, device)
        exit_step = _step(previous, merge_order(grid), device) if merge else grid_exit
        return cls(num_windows, steps, exit_step, grid_exit, masks)

    def mask(self, block: int, dtype: torch.dtype) -> torch.Tensor | None:
        mask = self.masks[block]
        if mask is None or mask.dtype == dtype:
            return mask
        key = (block, dtype)
        if key not in self._cast_masks:
            self._cast_masks[key] = mask.to(dtype)
        return self._cast_masks[key]


def _step(previous: torch.Tensor, order: torch.Tensor, device):
    """The gather taking tokens in ``previous`` order to ``order``; None if nothing moves."""
    index = inverse_permutation(previous)[order]
    if torch.equal(index, torch.arange(index.numel())):
        return None
    return index.to(device), inverse_permutation(index).to(device)


# --- attention module ------------------------------------------------------------------------


def fused_head_dim(head_dim: int, device: torch.device, pad: bool | None = None) -> int:
    """Head dim to run attention at: fused GPU kernels want a multiple of 8. Zero-padding q, k and
    v is exact (zeros add nothing to q.k, and padded output columns are dropped); on CPU the
    fused kernel takes any size, so by default (``pad=None``) only accelerators pad."""
    if pad is None:
        pad = device.type != "cpu"
    if not pad or head_dim % 8 == 0:
        return head_dim
    return (head_dim + 7) // 8 * 8


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, on tokens already in window order."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.pad_head_dim: bool | None = None  # None: pad on accelerators only (see fused_head_dim)

    def _weights(self, padded_dim: int):
        """qkv weights with output features reordered from (3, H, D) to (H, 3, D), so that q, k and
        v of shape (windows, batch * heads, N, D) are views of the projection's output; with
        ``padded_dim > D``, zero rows/columns make the padded head dims come out of (and go into)
        the projections directly. Both cost a copy of the small weights, not of the activations."""
        h, d, pad = self.num_heads, self.head_dim, padded_dim - self.head_dim
        c = h * d
        w_qkv = F.pad(self.qkv.weight.view(3, h, d, c), (0, 0, 0, pad)).transpose(0, 1).reshape(-1, c)
        b_qkv = None
        if self.qkv.bias is not None:
            b_qkv = F.pad(self.qkv.bias.view(3, h, d), (0, pad)).transpose(0, 1).reshape(-1)
        w_proj = self.proj.weight if pad == 0 else F.pad(self.proj.weight.view(c, h, d), (0, pad)).reshape(c, -1)
        return w_qkv, b_qkv, w_proj

    def forward(self, x: torch.Tensor, num_windows: int, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (num_windows * N, B, C) in window order; mask: (num_windows, 1, N, N) or None."""
        length, b, c = x.shape
        h, n = self.num_heads, length // num_windows
        d = fused_head_dim(self.head_dim, x.device, self.pad_head_dim)
        w_qkv, b_qkv, w_proj = self._weights(d)
        # windows lead and (batch, head) share the second axis: one (num_windows, 1, N, N) mask
        # broadcasts over any batch size, and q, k, v are strided views (no copy)
        qkv = F.linear(x, w_qkv, b_qkv).view(num_windows, n, b, h, 3, d)
        q, k, v = (t.permute(0, 2, 3, 1, 4).reshape(num_windows, b * h, n, d) for t in qkv.unbind(4))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.head_dim**-0.5,
        )
        # fused kernels return (.., N, H, D) memory viewed as (.., H, N, D): this is then a view too
        out = out.transpose(1, 2).reshape(length, b, h * d)
        return self.proj_drop(F.linear(out, w_proj, self.proj.bias))
