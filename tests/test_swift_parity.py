"""Published-SwiFT parity: the fixtures' features and logits reproduce through the public path
(a published-style checkpoint -> ``neurox convert-swift`` -> ``load_pretrained`` -> forward)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import neurox
from neurox.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from naive_swift import naive_forward_features  # noqa: E402

FIXTURES = ["small", "small_fullmsa", "twochan_firstwin2"]
TOL = 1e-4


def read_fixture(directory: Path, name: str):
    path = directory / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    return load_file(str(path)), config


def lightning_checkpoint(tensors, config, path: Path, namespace: bool) -> Path:
    """What a published SwiFT Lightning checkpoint holds, built from a fixture."""
    state = {f"model.{k[len('backbone.'):]}": v for k, v in tensors.items() if k.startswith("backbone.")}
    state |= {f"output_head.{k[len('head.'):]}": v for k, v in tensors.items() if k.startswith("head.")}
    hparams = dict(config, downstream_task="sex", precision=32, attn_drop_rate=0.0)
    checkpoint = {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "1.9.4",
        "state_dict": state,
        "hyper_parameters": argparse.Namespace(**hparams) if namespace else hparams,
    }
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_reproduces_through_convert_and_load(name, swift_fixture_dir, tmp_path):
    tensors, config = read_fixture(swift_fixture_dir, name)
    ckpt = lightning_checkpoint(tensors, config, tmp_path / "published.ckpt", namespace=name == "small")
    assert main(["convert-swift", str(ckpt), str(tmp_path / "model")]) == 0

    model = neurox.load_pretrained(tmp_path / "model").eval()
    assert model.head.task == "binary"  # the checkpoint's downstream_task was "sex"
    with torch.no_grad():
        features = model.forward_features(tensors["input"])
        logits = model.forward_head(features)
    assert features.shape == tensors["features"].shape
    assert (features - tensors["features"]).abs().max().item() < TOL
    assert (logits - tensors["logits"]).abs().max().item() < TOL


def test_plain_safetensors_state_dict_converts(swift_fixture_dir, tmp_path):
    """A bare backbone state dict (published key names, unused norm.* included) plus flags."""
    tensors, config = read_fixture(swift_fixture_dir, "small")
    bare = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    bare["head.weight"] = torch.zeros(1, 96)  # an old in-backbone head the published forward never uses
    save_file(bare, str(tmp_path / "backbone.safetensors"))
    args = ["convert-swift", str(tmp_path / "backbone.safetensors"), str(tmp_path / "model"),
            "--img_size", "48", "48", "48", "8", "--embed_dim", "24", "--depths", "2", "2", "2",
            "--num_heads", "3", "6", "12"]
    assert main(args) == 0
    model = neurox.load_pretrained(tmp_path / "model").eval()
    assert model.head is None
    with torch.no_grad():
        features = model.forward_features(tensors["input"])
    assert (features - tensors["features"]).abs().max().item() < TOL


@pytest.mark.parametrize("name", FIXTURES)
def test_benchmark_naive_path_matches_fixture(name, swift_fixture_dir, tmp_path):
    """The benchmark's naive path computes the same model, so comparing their speed is fair."""
    tensors, config = read_fixture(swift_fixture_dir, name)
    ckpt = lightning_checkpoint(tensors, config, tmp_path / "published.ckpt", namespace=False)
    main(["convert-swift", str(ckpt), str(tmp_path / "model")])
    model = neurox.load_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        features = naive_forward_features(model, tensors["input"])
    assert (features - tensors["features"]).abs().max().item() < TOL
