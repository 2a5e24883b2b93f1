"""Model directories and checkpoint conversion: round trips, clear errors, no pickled code run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import neurox
from neurox.cli import main
from neurox.config import InputContract, SwiFTConfig
from neurox.models import SwiFT, build_head

TINY = SwiFTConfig(img_size=(24, 24, 24, 8), embed_dim=12, depths=(2, 2), num_heads=(3, 3),
                   window_size=(2, 2, 2, 2), first_window_size=(2, 2, 2, 2))


def test_save_and_load_round_trip(tmp_path):
    model = SwiFT(TINY, build_head("regression", TINY.num_features, 2)).eval()
    contract = InputContract.for_model(TINY, tr=0.8, voxel_size_mm=4.0)
    neurox.save_pretrained(model, tmp_path / "m", contract=contract, card={"data": "synthetic cohort"})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "README.md", "config.json", "head.safetensors", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["neurox_version"] == neurox.__version__
    assert config["head"] == {"task": "regression", "num_outputs": 2, "hidden_dim": None, "standardize": False}
    assert "synthetic cohort" in (tmp_path / "m" / "README.md").read_text()

    loaded = neurox.load_pretrained(tmp_path / "m").eval()
    assert loaded.input_contract == contract
    x = torch.randn(1, 1, *TINY.img_size)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert neurox.load_pretrained(tmp_path / "m", with_head=False).head is None


def test_a_per_position_head_round_trips(tmp_path):
    head = build_head("binary", TINY.num_features, standardize=True, pool="tokens", positions=8)
    head.calibrate(torch.randn(10, head.feature_count))
    model = SwiFT(TINY, head).eval()
    neurox.save_pretrained(model, tmp_path / "m")
    loaded = neurox.load_pretrained(tmp_path / "m").eval()
    assert (loaded.head.pool, loaded.head.positions) == ("tokens", 8)
    x = torch.randn(2, 1, *TINY.img_size)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_shape_mismatch_names_the_first_mismatching_tensor(tmp_path):
    state = {k: v for k, v in SwiFT(TINY).state_dict().items()}
    state["layers.0.blocks.1.attn.qkv.weight"] = torch.zeros(30, 12)
    save_file(state, str(tmp_path / "bad.safetensors"))
    args = ["convert-swift", str(tmp_path / "bad.safetensors"), str(tmp_path / "out"),
            "--img_size", "24", "24", "24", "8", "--embed_dim", "12", "--depths", "2", "2",
            "--num_heads", "3", "3", "--window_size", "2", "2", "2", "2", "--first_window_size", "2", "2", "2", "2"]
    with pytest.raises(ValueError, match=r"'layers.0.blocks.1.attn.qkv.weight' has shape \(30, 12\).*\(36, 12\)"):
        main_raising(args)
    assert not (tmp_path / "out" / "config.json").exists()


def test_wrong_architecture_flags_give_a_clear_error(tmp_path, capsys):
    save_file(SwiFT(TINY).state_dict(), str(tmp_path / "tiny.safetensors"))
    # no flags: the paper configuration, which these weights do not fit
    assert main(["convert-swift", str(tmp_path / "tiny.safetensors"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "tiny.safetensors" in err and "patch_embed.fc.weight" in err


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "evil": _Exploit()}, tmp_path / "evil.ckpt")
    assert main(["convert-swift", "evil.ckpt", "out"]) == 1
    assert not (tmp_path / "pwned").exists()
    assert "cannot be loaded without running their code" in capsys.readouterr().err


def test_missing_checkpoint_and_not_a_model_dir(tmp_path, capsys):
    assert main(["convert-swift", str(tmp_path / "nope.ckpt"), str(tmp_path / "out")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a neurox model directory"):
        neurox.load_pretrained(tmp_path)


def test_smoke_command_writes_a_loadable_model(tmp_path, capsys):
    assert main(["smoke", "--preset", "demo", "--out", str(tmp_path / "m")]) == 0
    report = json.loads(capsys.readouterr().out.split("\nwrote")[0])
    assert report["features"] == [1, 96, 2, 2, 2, 20]
    assert neurox.load_pretrained(tmp_path / "m").head.task == "binary"
    (tmp_path / "run").mkdir()  # a run's folder given where its model is meant
    (tmp_path / "m").rename(tmp_path / "run" / "model")
    with pytest.raises(FileNotFoundError, match=f"; the run's model is {tmp_path / 'run' / 'model'}$"):
        neurox.load_pretrained(tmp_path / "run")


def main_raising(argv):
    """Run a CLI command through the library call it makes, so the exception itself is visible."""
    from neurox.cli import build_parser, cmd_convert_swift

    args = build_parser().parse_args(argv)
    return cmd_convert_swift(args[args.command])


def test_atomic_writes_leave_normal_permissions_and_no_temporaries(tmp_path):
    import os
    import stat

    from neurox.io.atomic import write_text_atomic

    write_text_atomic(tmp_path / "a.txt", "hello")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
