"""Published SwiFT checkpoints -> neurox models.

A published checkpoint is a PyTorch Lightning file: ``state_dict`` holds the backbone under
``model.*`` and the head under ``output_head.*``, and ``hyper_parameters`` the constructor
arguments. It is read with ``torch.load(weights_only=True)``, which refuses to run pickled code;
a plain safetensors state dict (prefixed or bare backbone keys) is read too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from neurox.config import InputContract, SwiFTConfig
from neurox.models.heads import build_head
from neurox.models.swift import SwiFT

# published hyper-parameter name -> SwiFTConfig field
HPARAM_FIELDS = {
    "img_size": "img_size",
    "in_chans": "in_chans",
    "embed_dim": "embed_dim",
    "window_size": "window_size",
    "first_window_size": "first_window_size",
    "patch_size": "patch_size",
    "depths": "depths",
    "num_heads": "num_heads",
    "c_multiplier": "c_multiplier",
    "last_layer_full_MSA": "last_layer_full_msa",
}
# keys the published backbone holds but never uses in its forward
UNUSED_BACKBONE_PREFIXES = ("norm.", "head.", "avgpool.")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return the flat state dict and the hyper-parameters (empty if the file has none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        hparams = json.loads(metadata["config"]) if "config" in metadata else {}
        return load_file(str(path)), hparams
    try:
        # Lightning stores hyper-parameters as a dict or an argparse.Namespace; both are plain data
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "refused"
        raise ValueError(
            f"{path}: the checkpoint holds Python objects that cannot be loaded without running their "
            f"code ({reason}); save its state_dict as safetensors and convert that file instead"
        ) from None
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({err})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, found {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    hparams = checkpoint.get("hyper_parameters", {}) or {}
    if isinstance(hparams, argparse.Namespace):
        hparams = vars(hparams)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: no tensors found (expected a 'state_dict' of model.* / output_head.* keys)")
    return tensors, dict(hparams)


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Backbone and head tensors under neurox names; keys the published model never uses dropped."""
    prefixed = any(k.startswith("model.") for k in state)
    backbone, head = {}, {}
    for key, tensor in state.items():
        if key.startswith("output_head."):
            head[key[len("output_head."):]] = tensor
        elif prefixed and key.startswith("model."):
            backbone[key[len("model."):]] = tensor
        elif not prefixed:
            backbone[key] = tensor
    backbone = {k: v for k, v in backbone.items() if not k.startswith(UNUSED_BACKBONE_PREFIXES)}
    return backbone, head


def config_from_hparams(hparams: dict[str, Any], overrides: dict[str, Any] | None = None) -> SwiFTConfig:
    """Architecture from published hyper-parameters; what they lack comes from ``overrides``,
    then from the paper configuration."""
    values = dataclasses.asdict(SwiFTConfig())
    for name, field_name in HPARAM_FIELDS.items():
        if hparams.get(name) is not None:
            values[field_name] = hparams[name]
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    return SwiFTConfig(**values)


def head_task(hparams: dict[str, Any], num_outputs: int) -> str | None:
    """What the published head predicts, where the hyper-parameters say so."""
    task_type = hparams.get("downstream_task_type")
    if task_type == "classification" or hparams.get("downstream_task") == "sex":
        return "binary" if num_outputs == 1 else "multiclass"
    if task_type == "regression" or hparams.get("downstream_task") not in (None, "sex"):
        return "regression"
    return None


def convert_swift(
    checkpoint: str | Path,
    out_dir: str | Path,
    overrides: dict[str, Any] | None = None,
    task: str | None = None,
) -> Path:
    """Convert a published SwiFT checkpoint into a neurox model directory."""
    from neurox.hub import load_checked, save_pretrained

    state, hparams = read_checkpoint(checkpoint)
    backbone_state, head_state = split_state(state)
    config = config_from_hparams(hparams, overrides)
    model = SwiFT(config)
    load_checked(model, backbone_state, checkpoint)
    if head_state:
        if "head.weight" not in head_state:
            raise ValueError(f"{checkpoint}: output_head.* has no head.weight; unknown head layout")
        num_outputs = head_state["head.weight"].shape[0]
        hidden = head_state["hidden.weight"].shape[0] if "hidden.weight" in head_state else None
        head = build_head(task or head_task(hparams, num_outputs), config.num_features, num_outputs, hidden)
        load_checked(head, head_state, checkpoint)
        model.head = head
    contract = InputContract.for_model(
        config,
        space=None,
        voxel_size_mm=2.0 if config.img_size[:3] == (96, 96, 96) else None,
        notes="converted from a published SwiFT checkpoint: the published preprocessing (MNI 2 mm, one "
        "z-score over in-brain voxels of the run, background set to the minimum); check the space and "
        "crop of the data it was trained on",
    )
    source = {"converted_from": str(Path(checkpoint).name), "hyper_parameters": _jsonable(hparams)}
    return save_pretrained(model, out_dir, contract=contract, source=source)


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        return repr(value)
