"""Self-supervised objectives and the augmentations they use, all on whole batches on the device.

- Contrastive (as published for SwiFT): NT-Xent on L2-normalised projections with cosine
  similarity and a temperature (0.1). ``instance`` mode: the two windows of a participant are
  positives, every other participant in the global batch (gathered from every process, gradients
  flowing back) a negative. ``local_temporal`` mode: two augmented views of one window are
  positives, the views of the participant's other window negatives.
- Masked image modelling (as SwiFT's successors use it): ``token_mask`` is the one place that
  decides what is hidden (a ratio of the 4D patch tokens, or with ``tube`` of the spatial positions,
  in every frame); the backbone sees a learned mask token there; a light decoder (linear, or a few
  transformer layers then linear) reconstructs every voxel of each masked patch from the last
  stage's features, and the loss is the L1 error on masked voxels inside the brain.
- ``augment``: one random affine per sample applied to every frame (``affine_grid`` /
  ``grid_sample``), Gaussian noise drawn per frame, light Gaussian smoothing. It returns a new
  tensor; the input batch is never changed in place.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

OBJECTIVES = ("contrastive", "mim")
CONTRASTIVE_MODES = ("instance", "local_temporal")
MASK_SHAPES = ("random", "tube")


# --- contrastive ---------------------------------------------------------------------------------


class _GatherRows(torch.autograd.Function):
    """Every process's rows (the same number each) in rank order. Backward: each process's loss
    depends on every process's rows, so a process's rows get the sum of all processes' gradients for
    them (an all-reduce, then its own slice: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


def gather_with_grad(z: torch.Tensor) -> torch.Tensor:
    """Rows of every process in rank order; gradients flow back to each process's own rows."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return z
    return _GatherRows.apply(z)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent between paired rows of ``a`` and ``b`` (N, D), negatives every other row of both,
    across every process. Rows need not be normalised (cosine similarity is taken here)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    offset = 0
    if dist.is_initialized() and dist.get_world_size() > 1:
        offset = dist.get_rank() * a.shape[0]
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    everything = torch.cat([all_a, all_b])  # (2 N_global, D)
    n_global = all_a.shape[0]
    local = torch.cat([a, b])  # (2 N, D)
    logits = local @ everything.T / temperature
    rows = torch.arange(a.shape[0], device=a.device) + offset
    self_index = torch.cat([rows, rows + n_global])
    positive = torch.cat([rows + n_global, rows])
    logits = logits.masked_fill(F.one_hot(self_index, everything.shape[0]).bool(), float("-inf"))
    return F.cross_entropy(logits, positive)


def local_temporal_loss(views: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``views`` (N, 4, D): two views of window 1, two of window 2, per participant. Each view's
    positive is the other view of its window; the views of the other window are its negatives."""
    v = F.normalize(views.float(), dim=-1)
    sim = v @ v.transpose(1, 2) / temperature  # (N, 4, 4)
    sim = sim.masked_fill(torch.eye(4, dtype=torch.bool, device=v.device), float("-inf"))
    positive = torch.tensor([1, 0, 3, 2], device=v.device).expand(v.shape[0], 4)
    return F.cross_entropy(sim.reshape(-1, 4), positive.reshape(-1))


# --- masked image modelling -------------------------------------------------------------------------


def token_mask(batch: int, grid, ratio: float, generator: torch.Generator | None = None,
               device=None, shape: str = "random") -> torch.Tensor:
    """(B, X', Y', Z', T') bool, True where the patch token is hidden. ``random``: exactly
    ``round(ratio * L)`` of the L tokens per sample, chosen uniformly. ``tube``: that ratio of the
    spatial positions, hidden in every frame of the window (as VideoMAE masks video): BOLD changes
    slowly from frame to frame, so a token hidden in one frame alone is recovered from the same place
    a frame earlier or later, while a hidden tube must be inferred from other regions."""
    if shape not in MASK_SHAPES:
        raise ValueError(f"unknown mask shape {shape!r}; choose one of {', '.join(MASK_SHAPES)}")
    drawn = tuple(grid) if shape == "random" else (*grid[:3], 1)  # a tube is drawn once, for every frame
    length = math.prod(drawn)
    hidden = int(round(ratio * length))
    if not 0 < hidden < length:
        raise ValueError(f"a mask ratio of {ratio} hides {hidden} of {length} tokens; choose it in (0, 1)")
    scores = torch.rand(batch, length, generator=generator, device="cpu").to(device)
    order = scores.argsort(dim=1)
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :hidden], True)
    return mask.view(batch, *drawn).expand(batch, *grid).contiguous()


class MIMDecoder(nn.Module):
    """The light decoder: ``depth`` transformer layers over every last-stage token (none by default,
    SimMIM's linear head), then a linear map from each token to every voxel of the patches it covers,
    rearranged back to the input layout. Layers here take over part of the inpainting, so the
    backbone's last stage need not be a linear code of the voxels (MAE found a deeper decoder gives a
    better linear probe of the encoder for that reason)."""

    def __init__(self, in_features: int, patch_size, in_chans: int, upscale: int, grid=None, depth: int = 0):
        super().__init__()
        self.patch_size, self.in_chans, self.upscale = tuple(patch_size), in_chans, upscale
        sx, sy, sz, st = self.patch_size
        if depth:
            if grid is None:
                raise ValueError("a decoder with layers needs the last stage's token grid")
            gx, gy, gz, gt = grid
            # its own position (space, and time within the window): the layers mix tokens
            self.place = nn.Parameter(torch.zeros(1, gx, gy, gz, 1, in_features))
            self.time = nn.Parameter(torch.zeros(1, 1, 1, 1, gt, in_features))
            nn.init.trunc_normal_(self.place, std=0.02)
            nn.init.trunc_normal_(self.time, std=0.02)
        heads = in_features // 32 if in_features % 32 == 0 else 1  # heads 32 wide where the width allows
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(in_features, heads, 4 * in_features, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(depth))
        self.proj = nn.Linear(in_features, upscale**3 * sx * sy * sz * st * in_chans)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C', X'', Y'', Z'', T') -> (B, C, X, Y, Z, T)."""
        b, _, gx, gy, gz, gt = features.shape
        sx, sy, sz, st = self.patch_size
        u, c = self.upscale, self.in_chans
        tokens = features.permute(0, 2, 3, 4, 5, 1)  # (B, gx, gy, gz, gt, C')
        if self.layers:
            flat = (tokens + self.place + self.time).reshape(b, gx * gy * gz * gt, -1)
            for layer in self.layers:
                flat = layer(flat)
            tokens = flat.view(b, gx, gy, gz, gt, -1)
        out = self.proj(tokens)  # (B, gx, gy, gz, gt, u^3 s... c)
        out = out.view(b, gx, gy, gz, gt, u, u, u, sx, sy, sz, st, c)
        # voxel x = (gx * u + ux) * sx + px, likewise y, z; t = gt * st + pt
        out = out.permute(0, 12, 1, 5, 8, 2, 6, 9, 3, 7, 10, 4, 11)
        return out.reshape(b, c, gx * u * sx, gy * u * sy, gz * u * sz, gt * st)


def voxel_mask(token_hidden: torch.Tensor, patch_size) -> torch.Tensor:
    """(B, X', Y', Z', T') token mask -> (B, 1, X, Y, Z, T) voxel mask."""
    sx, sy, sz, st = patch_size
    m = token_hidden[:, None]
    for axis, size in zip(range(2, 6), (sx, sy, sz, st)):
        m = m.repeat_interleave(size, dim=axis)
    return m


def mim_loss(reconstruction: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor,
             brain: torch.Tensor) -> torch.Tensor:
    """L1 on voxels that are hidden and inside the brain (``brain`` (B, 1, X, Y, Z, 1) or full)."""
    weight = (hidden & brain).float()
    return ((reconstruction.float() - target.float()).abs() * weight).sum() / weight.sum().clamp_min(1.0)


# --- augmentations ------------------------------------------------------------------------------------


def augment(x: torch.Tensor, generator: torch.Generator, rotate_deg: float = 8.0, scale: float = 0.05,
            shift_voxels: float = 2.0, noise: float = 0.1, smooth_sigma: float = 0.5,
            background: torch.Tensor | float | None = None) -> torch.Tensor:
    """A new, augmented copy of ``x`` (B, C, X, Y, Z, T): per sample one random rotation, scaling and
    translation for every frame (trilinear), outside-of-volume filled with the background value;
    Gaussian noise with a std drawn per frame (up to ``noise`` x the sample's std); Gaussian smoothing
    with a sigma drawn per sample (up to ``smooth_sigma`` voxels). Randomness comes from ``generator``
    (CPU), so a run is reproducible whatever the device."""
    b, c, sx, sy, sz, t = x.shape
    device = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator).to(device)

    fill = x.amin(dim=(1, 2, 3, 4, 5)) if background is None else torch.as_tensor(background, device=device).expand(b)
    angles = (rand(b, 3) * 2 - 1) * math.radians(rotate_deg)
    rotation = _rotation_matrices(angles) * (1 + (rand(b, 1, 1) * 2 - 1) * scale)
    shift = (rand(b, 3) * 2 - 1) * shift_voxels * 2 / torch.tensor([sx, sy, sz], device=device)
    theta = torch.cat([rotation, shift[:, :, None]], dim=2)  # (B, 3, 4), in (x, y, z) order
    # grid_sample's 3D layout is (N, C, D, H, W) with grid (x, y, z) -> (W, H, D): put our X last
    volumes = (x - fill.view(b, 1, 1, 1, 1, 1)).permute(0, 1, 5, 4, 3, 2).reshape(b, c * t, sz, sy, sx)
    grid = F.affine_grid(theta.to(x.dtype), list(volumes.shape), align_corners=False)
    moved = F.grid_sample(volumes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if smooth_sigma > 0:
        moved = _smooth(moved, rand(b) * smooth_sigma)
    out = moved.view(b, c, t, sz, sy, sx).permute(0, 1, 5, 4, 3, 2) + fill.view(b, 1, 1, 1, 1, 1)
    if noise > 0:
        level = rand(b, 1, 1, 1, 1, t) * noise * x.std(dim=(1, 2, 3, 4, 5)).view(b, 1, 1, 1, 1, 1)
        # the bulk of the noise is drawn on the device, from a generator seeded by the CPU one
        on_device = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        out = out + level * torch.randn(out.shape, generator=on_device, device=device, dtype=x.dtype)
    return out


def _rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    cx, cy, cz = torch.cos(angles).unbind(1)
    sx, sy, sz = torch.sin(angles).unbind(1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def _smooth(volumes: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian (3 taps) per sample with its own sigma; (B, K, D, H, W)."""
    b, k = volumes.shape[:2]
    taps = torch.arange(-1, 2, device=volumes.device, dtype=volumes.dtype)
    weights = torch.exp(-(taps**2)[None] / (2 * sigma.to(volumes.dtype)[:, None].clamp_min(1e-3) ** 2))
    weights = weights / weights.sum(1, keepdim=True)  # (B, 3)
    out = volumes.reshape(1, b * k, *volumes.shape[2:])
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = 3
        kernel = weights.repeat_interleave(k, dim=0).view(b * k, 1, *shape)
        out = F.conv3d(F.pad(out, _pad_for(axis), mode="replicate"), kernel, groups=b * k)
    return out.view_as(volumes)


def _pad_for(axis: int) -> tuple[int, ...]:
    """F.pad's (W, W, H, H, D, D) padding of one tap on each side of ``axis`` (0 = D)."""
    pad = [0] * 6
    pad[4 - 2 * axis] = pad[5 - 2 * axis] = 1
    return tuple(pad)
