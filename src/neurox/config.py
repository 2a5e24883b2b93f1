"""Frozen configuration dataclasses and named presets.

Configs are plain code: a preset is a function of nothing that returns a dataclass, and a user
changes one field with ``dataclasses.replace``. Every config round-trips through ``to_dict`` /
``from_dict`` so that it can live in a model directory's ``config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _tuple(value) -> tuple:
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class SwiFTConfig:
    """Architecture of the SwiFT backbone (Kim et al., NeurIPS 2023).

    Field names follow the published constructor where one exists so that a published
    checkpoint's hyper-parameters map onto this class one to one.
    """

    img_size: tuple[int, int, int, int] = (96, 96, 96, 20)
    in_chans: int = 1
    patch_size: tuple[int, int, int, int] = (6, 6, 6, 1)
    embed_dim: int = 36
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: tuple[int, int, int, int] = (4, 4, 4, 4)
    first_window_size: tuple[int, int, int, int] = (4, 4, 4, 4)
    c_multiplier: int = 2
    last_layer_full_msa: bool = False
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self):
        for name in ("img_size", "patch_size", "window_size", "first_window_size", "depths", "num_heads"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        self.validate()

    # Derived geometry -------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def patch_grid(self) -> tuple[int, int, int, int]:
        """Token grid of the first stage: (X, Y, Z, T) after patch embedding."""
        return tuple(s // p for s, p in zip(self.img_size, self.patch_size))  # type: ignore[return-value]

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * self.c_multiplier**stage

    def stage_grid(self, stage: int, frames: int | None = None) -> tuple[int, int, int, int]:
        """Token grid of a stage; patch merging halves space, never time."""
        x, y, z, t = self.patch_grid
        f = 2**stage
        return (x // f, y // f, z // f, t if frames is None else frames)

    def stage_window(self, stage: int) -> tuple[int, int, int, int]:
        """The window a stage was configured with, before clamping to the grid."""
        if stage == 0:
            return self.first_window_size
        if self.last_layer_full_msa and stage == self.num_stages - 1:
            x, y, z, _ = self.stage_grid(stage)
            return (x, y, z, self.window_size[3])
        return self.window_size

    @property
    def num_features(self) -> int:
        return self.stage_dim(self.num_stages - 1)

    def validate(self) -> None:
        """Refuse, with a message saying what to change, any geometry the backbone cannot run."""
        if len(self.img_size) != 4 or len(self.patch_size) != 4:
            raise ValueError("img_size and patch_size need four numbers: X, Y, Z, T")
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} need the same, non-zero, length")
        for axis, (s, p) in enumerate(zip(self.img_size, self.patch_size)):
            if p < 1 or s % p:
                raise ValueError(
                    f"img_size {self.img_size} is not divisible by patch_size {self.patch_size} on axis {axis}"
                )
        merge = 2 ** (self.num_stages - 1)
        for axis, g in enumerate(self.patch_grid[:3]):
            if g % merge:
                raise ValueError(
                    f"the patch grid {self.patch_grid[:3]} must be divisible by {merge} on every spatial axis "
                    f"so that {self.num_stages - 1} patch merges halve it exactly (axis {axis} is {g})"
                )
        for stage in range(self.num_stages):
            dim, heads = self.stage_dim(stage), self.num_heads[stage]
            if dim % heads:
                raise ValueError(f"stage {stage}: channels {dim} are not divisible by {heads} heads")
            check_window_fits(self.stage_grid(stage), self.stage_window(stage), stage)
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SwiFTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SwiFT config fields: {', '.join(unknown)}")
        return cls(**data)


def clamp_window(grid, window) -> tuple[tuple[int, ...], bool]:
    """The window actually used on a grid, as published: an axis not larger than the window gets
    the whole axis as its window and is never shifted. Returns the window and, per axis, whether
    shifting is allowed."""
    used = tuple(g if g <= w else w for g, w in zip(grid, window))
    shiftable = tuple(g > w for g, w in zip(grid, window))
    return used, shiftable


def check_window_fits(grid, window, stage: int) -> None:
    used, _ = clamp_window(grid, window)
    for axis, (g, w) in enumerate(zip(grid, used)):
        if g % w:
            raise ValueError(
                f"stage {stage}: token grid {tuple(grid)} is not divisible by window {tuple(used)} on axis "
                f"{axis}; choose an image size or window so that windows tile the grid exactly"
            )


def swift_paper() -> SwiFTConfig:
    """The configuration of the SwiFT paper: 96^3 x 20 input, 2 mm MNI, 4.3 M parameters."""
    return SwiFTConfig()


def swift_demo() -> SwiFTConfig:
    """A small model for CPU demos and tests: 4 mm MNI grid (48^3), 20 frames, 3 stages."""
    return SwiFTConfig(
        img_size=(48, 48, 48, 20),
        patch_size=(6, 6, 6, 1),
        embed_dim=24,
        depths=(2, 2, 2),
        num_heads=(3, 6, 12),
        window_size=(4, 4, 4, 4),
        first_window_size=(4, 4, 4, 4),
    )


PRESETS = {"swift_paper": swift_paper, "demo": swift_demo}


def preset(name: str) -> SwiFTConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


# The default box every subject is cut to: 192 mm a side in MNI (RAS) coordinates, voxel 0 centred at
# MNI_BOX_ORIGIN_MM. It holds the MNI152 brain (x -72..72, y -106..72, z -72..82 mm) with margin.
MNI_BOX_MM = 192
MNI_BOX_ORIGIN_MM = (-96.0, -112.0, -90.0)


@dataclass(frozen=True)
class InputContract:
    """What a model expects of its input, carried in every model directory so that ``prepare``
    can reproduce it on new data. ``None`` means not recorded (for example a converted checkpoint
    whose training data we did not see)."""

    space: str | None = None  # the MNI template by fMRIPrep's name (MNI152NLin2009cAsym), as the training store says
    orientation: str = "RAS"
    voxel_size_mm: float | None = 2.0
    grid: tuple[int, int, int] = (96, 96, 96)
    crop_box: tuple[tuple[float, float], ...] | None = None  # mm: first and last voxel centre per axis
    normalization: str | None = "global_zscore"
    denoising: str | None = None  # confounds regressed out by prepare (none, simple, compcor, +global_signal)
    window_frames: int = 20
    tr: float | None = None
    tr_resampled: bool = False  # every run was resampled in time onto ``tr`` (prepare --resample_tr): --like does too
    bold_desc: str | None = None  # the desc- of the fMRIPrep-layout runs read (preproc; smoothAROMAnonaggr, ...)
    channels: int = 1
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputContract:
        data = dict(data)
        data["grid"] = _tuple(data.get("grid", (96, 96, 96)))
        if data.get("crop_box") is not None:
            data["crop_box"] = tuple(tuple(float(v) for v in b) for b in data["crop_box"])
        return cls(**data)

    @classmethod
    def for_model(cls, config: SwiFTConfig, **overrides) -> InputContract:
        """The default contract for a model: its grid filling the default MNI box (96^3 -> 2 mm,
        48^3 -> 4 mm), one z-score per run, its window length."""
        x, y, z, t = config.img_size
        values = {"grid": (x, y, z), "window_frames": t, "channels": config.in_chans}
        if x == y == z and MNI_BOX_MM % x == 0:
            voxel = MNI_BOX_MM / x
            values["voxel_size_mm"] = voxel
            values["crop_box"] = tuple((o, o + (x - 1) * voxel) for o in MNI_BOX_ORIGIN_MM)
        values.update(overrides)
        return cls(**values)
