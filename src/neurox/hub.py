"""Model directories: ``save_pretrained`` writes one, ``load_pretrained`` reads one.

A model directory holds ``config.json`` (architecture, head, input contract, neurox version),
``model.safetensors`` (backbone weights), optional ``head.safetensors`` and a ``README.md`` model
card. Nothing in it is pickled, so loading one never runs code from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from neurox import __version__
from neurox.config import InputContract, SwiFTConfig
from neurox.io.atomic import write_atomic, write_text_atomic
from neurox.models import SwiFT, build_head

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
HEAD_FILE = "head.safetensors"
CARD_FILE = "README.md"


def save_pretrained(
    model: SwiFT,
    out_dir: str | Path,
    contract: InputContract | None = None,
    card: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a model directory. ``card`` fills the model card (keys: data, objective,
    metrics, notes); ``source`` records where the weights came from."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    contract = contract or getattr(model, "input_contract", None) or InputContract.for_model(model.config)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    config = {
        "neurox_version": __version__,
        "architecture": "swift",
        "model": model.config.to_dict(),
        "head": model.head.spec() if model.head is not None else None,
        "input_contract": contract.to_dict(),
        "source": source or {},
    }
    write_atomic(out / MODEL_FILE, lambda p: save_file(backbone, str(p), metadata={"format": "pt"}))
    if head:
        write_atomic(out / HEAD_FILE, lambda p: save_file(head, str(p), metadata={"format": "pt"}))
    else:
        (out / HEAD_FILE).unlink(missing_ok=True)
    write_text_atomic(out / CARD_FILE, model_card(config, card or {}))
    # config.json last: a directory with a config is a complete one
    write_text_atomic(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        inside = Path(model_dir) / "model"  # a run's folder given for its model
        per_fold = Path(model_dir) / "fold1" / "model"  # a cross-validated run's folder (finetune --folds)
        raise FileNotFoundError(f"{model_dir}: not a neurox model directory (no {CONFIG_FILE})"
                                + (f"; the run's model is {inside}" if (inside / CONFIG_FILE).is_file() else "")
                                + (f"; a cross-validated run has a model per fold: {per_fold}, ..."
                                   if (per_fold / CONFIG_FILE).is_file() else ""))
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if config.get("architecture") != "swift":
        raise ValueError(f"{path}: unknown architecture {config.get('architecture')!r}")
    return config


def load_pretrained(model_dir: str | Path, with_head: bool = True, map_location: str = "cpu") -> SwiFT:
    """The model stored in ``model_dir``; ``model.input_contract`` says what input it expects, ``model.model_dir``
    where it came from."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    arch = SwiFTConfig.from_dict(config["model"])
    head_spec = config.get("head")
    head = None
    if with_head and head_spec and (model_dir / HEAD_FILE).is_file():
        head = build_head(head_spec["task"], arch.num_features, head_spec["num_outputs"], head_spec.get("hidden_dim"),
                          head_spec.get("standardize", False), head_spec.get("pool", "mean"),
                          head_spec.get("positions", 1))
    model = SwiFT(arch)
    load_checked(model, load_file(str(model_dir / MODEL_FILE), device=map_location), model_dir / MODEL_FILE)
    if head is not None:
        load_checked(head, load_file(str(model_dir / HEAD_FILE), device=map_location), model_dir / HEAD_FILE)
        model.head = head
    model.input_contract = InputContract.from_dict(config.get("input_contract", {}))
    model.model_dir = model_dir
    return model


def weights_digest(model_dir: str | Path) -> str:
    """A digest of a model directory's weights (backbone and head), or of a run directory's ``model/``: what
    outputs computed from the model depend on, whatever its path."""
    import hashlib

    model_dir = Path(model_dir)
    if (model_dir / "model" / "config.json").is_file():
        model_dir = model_dir / "model"
    digest = hashlib.sha256()
    for name in ("model.safetensors", "head.safetensors"):
        if (model_dir / name).is_file():
            with open(model_dir / name, "rb") as f:  # in pieces: a large model is not read into memory whole
                for piece in iter(lambda: f.read(1 << 24), b""):
                    digest.update(piece)
    return digest.hexdigest()


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` into ``module``, refusing with one clear line on the first tensor whose name
    or shape does not match the architecture."""
    expected = module.state_dict()
    for name, tensor in expected.items():  # in the architecture's order: the first mismatch is the earliest
        if name in state and tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(state[name].shape)} but the architecture "
                f"expects {tuple(tensor.shape)}; the configuration does not match these weights"
            )
    unexpected = [name for name in state if name not in expected]
    if unexpected:
        raise ValueError(f"{source}: tensor {unexpected[0]!r} has no place in this architecture "
                         f"({len(unexpected)} such); the checkpoint is of another model or configuration")
    missing = [name for name in expected if name not in state]
    if missing:
        raise ValueError(f"{source}: {len(missing)} tensors missing, first {missing[0]!r}")
    module.load_state_dict(state, strict=True)


def model_card(config: dict[str, Any], card: dict[str, Any]) -> str:
    arch, contract = config["model"], config["input_contract"]
    head = config.get("head")
    lines = [
        "# neurox model",
        "",
        f"SwiFT backbone, {sum(arch['depths'])} blocks in {len(arch['depths'])} stages, "
        f"embed dim {arch['embed_dim']}, input {tuple(arch['img_size'])} (X, Y, Z, T), "
        f"{arch['in_chans']} channel(s).",
        f"Head: {head['task'] or 'unspecified task'}, {head['num_outputs']} output(s)." if head else "Head: none.",
        "",
        "## Input contract",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in contract.items() if value not in (None, "", {})]
    for section in ("data", "objective", "metrics", "notes"):
        if card.get(section):
            lines += ["", f"## {section.capitalize()}", "", *_card_text(card[section])]
    if config.get("source"):
        lines += ["", "## Source", ""] + [f"- {k}: {v}" for k, v in config["source"].items()]
    lines += ["", "Load it with `neurox.load_pretrained(path)`.", ""]
    return "\n".join(lines)


def _card_text(value: Any) -> list[str]:
    """A card section as lines a person reads: a mapping as ``- key: value`` with numbers to 4 significant digits."""
    if not isinstance(value, dict):
        return [str(value)]
    return [f"- {key.replace('_', ' ')}: {f'{item:.4g}' if isinstance(item, float) else item}"
            for key, item in value.items()]
