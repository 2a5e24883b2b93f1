"""The SwiFT backbone: parameter count, shapes, gradients, configuration errors, fast-path options."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from neurox.config import SwiFTConfig, preset, swift_paper
from neurox.models import SwiFT, build_head, num_parameters

TINY = SwiFTConfig(img_size=(24, 24, 24, 8), embed_dim=12, depths=(2, 2), num_heads=(3, 3),
                   window_size=(2, 2, 2, 2), first_window_size=(2, 2, 2, 2))


def test_paper_config_parameter_count():
    # the published 4,315,212 less the 576 of the final LayerNorm its forward never uses
    assert num_parameters(SwiFT(swift_paper())) == 4_314_636


def test_presets():
    assert preset("swift_paper") == swift_paper()
    assert preset("demo").img_size == (48, 48, 48, 20)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


@pytest.mark.parametrize(
    "config,features",
    [
        # clamped windows: stage 2 grid (2,2,2) under window 4 -> whole-axis windows, time-only shift
        (dataclasses.replace(TINY, window_size=(4, 4, 4, 4)), (12 * 2, 2, 2, 2, 8)),
        # two input channels
        (dataclasses.replace(TINY, in_chans=2), (24, 2, 2, 2, 8)),
        # three stages, last-stage full attention, a first-stage window of 2
        (SwiFTConfig(img_size=(48, 48, 48, 8), embed_dim=12, depths=(2, 2, 2), num_heads=(3, 3, 6),
                     window_size=(4, 4, 4, 4), first_window_size=(2, 2, 2, 2), last_layer_full_msa=True),
         (48, 2, 2, 2, 8)),
        # temporal patches of 2 frames, non-cubic space
        (SwiFTConfig(img_size=(24, 36, 24, 8), patch_size=(6, 6, 6, 2), embed_dim=12, depths=(2, 2),
                     num_heads=(3, 3), window_size=(2, 3, 2, 2), first_window_size=(2, 3, 2, 2)),
         (24, 2, 3, 2, 4)),
    ],
)
def test_output_shapes_for_odd_configurations(config, features):
    model = SwiFT(config, build_head("regression", config.num_features, num_outputs=3))
    x = torch.randn(2, config.in_chans, *config.img_size)
    out = model.forward_features(x)
    assert out.shape == (2, *features)
    assert model.forward_head(out).shape == (2, 3)


def test_gradients_reach_every_parameter():
    config = dataclasses.replace(TINY, window_size=(4, 4, 4, 4), drop_path_rate=0.1)
    model = SwiFT(config, build_head("binary", config.num_features))
    model(torch.randn(2, 1, *config.img_size)).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_batch_elements_are_independent():
    """The token-major layout must not mix samples: a sample's output ignores its batch mates."""
    model = SwiFT(TINY).eval()
    x = torch.randn(3, 1, *TINY.img_size)
    with torch.no_grad():
        together = model.forward_features(x)
        alone = model.forward_features(x[1:2])
    assert torch.allclose(together[1:2], alone, atol=1e-5)


def test_an_earlier_stage_is_its_own_output_before_merging_in_grid_order():
    """``forward_features(x, stages=k)``: stage k's tokens at their places in its grid (what the patch
    merging then concatenates in 2 x 2 x 2 groups), and all stages by default."""
    from neurox.models.attention import merge_order

    model = SwiFT(TINY).eval()
    x = torch.randn(2, 1, *TINY.img_size)
    seen = {}

    def keep(_module, inputs, _output):  # returns None: a hook's return value would replace the output
        seen.setdefault("merging", inputs[0])

    model.layers[0].downsample.register_forward_hook(keep)
    with torch.no_grad():
        last = model.forward_features(x)
        first = model.forward_features(x, stages=1)
        assert torch.equal(model.forward_features(x, stages=2), last)
    grid = TINY.stage_grid(0)
    in_grid_order = torch.empty_like(seen["merging"])
    in_grid_order[merge_order(grid)] = seen["merging"]  # the merging reads tokens in merge order
    assert first.shape == (2, TINY.stage_dim(0), *grid)
    assert torch.equal(first, in_grid_order.view(*grid, 2, -1).permute(4, 5, 0, 1, 2, 3))
    with pytest.raises(ValueError, match="stages must be 1 to 2"):
        model.forward_features(x, stages=3)


def test_shorter_window_than_the_temporal_embedding():
    model = SwiFT(TINY)
    assert model.forward_features(torch.randn(1, 1, 24, 24, 24, 4)).shape[-1] == 4


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"img_size": (25, 24, 24, 8)}, "not divisible by patch_size"),
        ({"img_size": (30, 24, 24, 8)}, "must be divisible by 2"),  # patch grid 5 cannot be halved
        ({"img_size": (24, 24, 24, 6), "window_size": (2, 2, 2, 4), "first_window_size": (2, 2, 2, 4)},
         "not divisible by window"),
        ({"num_heads": (3,)}, "same, non-zero, length"),
        ({"embed_dim": 10}, "not divisible by 3 heads"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
    ],
)
def test_bad_configuration_is_refused_at_construction(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **changes)


def test_bad_input_is_refused_with_a_clear_message():
    model = SwiFT(TINY)
    with pytest.raises(ValueError, match="at most 8 .*temporal embedding"):
        model(torch.randn(1, 1, 24, 24, 24, 10))
    with pytest.raises(ValueError, match="channels 1"):
        model(torch.randn(1, 2, 24, 24, 24, 8))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 24, 24, 24, 8))


def test_grad_checkpointing_gives_the_same_gradients():
    model = SwiFT(TINY, build_head("binary", TINY.num_features))
    x = torch.randn(2, 1, *TINY.img_size)
    model(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, expected[name], atol=1e-5), name


def test_bf16_autocast_runs_and_stays_close():
    model = SwiFT(TINY, build_head("binary", TINY.num_features))
    x = torch.randn(2, 1, *TINY.img_size)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        out.float().sum().backward()
    assert torch.allclose(out.float(), reference, atol=0.1)


def test_heads():
    features = torch.randn(4, 24, 2, 2, 2, 8)
    assert build_head("binary", 24)(features).shape == (4, 1)
    assert build_head("multiclass", 24, 5)(features).shape == (4, 5)
    assert build_head("regression", 24, 2)(features).shape == (4, 2)
    z = build_head("contrastive", 24, 16)(features)
    assert z.shape == (4, 16) and torch.allclose(z.norm(dim=-1), torch.ones(4))
    with pytest.raises(ValueError, match="multiclass"):
        build_head("binary", 24, 2)
    with pytest.raises(ValueError, match="unknown task"):
        build_head("ranking", 24)


def test_pooled_heads_read_what_the_probe_pools():
    """--head_pool: mean_std and tokens are the readouts of neurox probe --pool, per window; a head reads
    exactly its pooled features, and refuses features of another grid."""
    from neurox.analysis.embed import participant_vector
    from neurox.models.heads import pool_features

    features = torch.randn(3, 24, 2, 2, 2, 8, dtype=torch.float64)
    for pool in ("mean", "mean_std", "tokens"):  # one window: the probe's participant vector of that window
        series = features[0].flatten(1, 3).numpy()[None]  # (windows, C, positions, T)
        expected = participant_vector(series, pool)
        assert torch.allclose(pool_features(features, pool)[0], torch.as_tensor(expected))
    head = build_head("binary", 24, pool="tokens", positions=8).double().eval()
    assert head.head.in_features == 2 * 24 * 8
    assert head.spec()["pool"] == "tokens" and head.spec()["positions"] == 8
    assert "pool" not in build_head("binary", 24).spec()  # earlier model directories read the same
    assert torch.allclose(head(features), head.head(pool_features(features, "tokens")))
    with pytest.raises(ValueError, match="different input grid"):
        head(torch.randn(3, 24, 4, 2, 2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown head pool"):
        build_head("binary", 24, pool="max")
    with pytest.raises(ValueError, match="contrastive"):
        build_head("contrastive", 24, 16, pool="tokens", positions=8)


def test_torch_compile_matches_eager_in_one_graph():
    """The whole model compiles as one graph (no breaks), forward and backward."""
    model = SwiFT(TINY, build_head("binary", TINY.num_features))
    x = torch.randn(2, 1, *TINY.img_size)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert torch.allclose(out, expected, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters())
