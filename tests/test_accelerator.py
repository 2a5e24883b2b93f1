"""Checks that need a GPU (skipped without one): published parity on the device, exact head-dim
padding, the fused attention kernels actually running (no silent fallback to the math path), and the
helpers between processes on an NCCL group."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import neurox
from neurox.config import SwiFTConfig
from neurox.models import SwiFT, build_head

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")

# head dim 12, as in the paper configuration: padded to 16 on the GPU
HEAD12 = SwiFTConfig(img_size=(48, 48, 48, 8), embed_dim=36, depths=(2, 2, 2), num_heads=(3, 6, 12),
                     window_size=(4, 4, 4, 4), first_window_size=(4, 4, 4, 4))


@pytest.fixture(autouse=True)
def _strict_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_fixture_parity_on_gpu(swift_fixture_dir, tmp_path):
    from test_swift_parity import FIXTURES, TOL, lightning_checkpoint, read_fixture

    from neurox.cli import main

    for name in FIXTURES:
        tensors, config = read_fixture(swift_fixture_dir, name)
        ckpt = lightning_checkpoint(tensors, config, tmp_path / f"{name}.ckpt", namespace=False)
        assert main(["convert-swift", str(ckpt), str(tmp_path / name)]) == 0
        model = neurox.load_pretrained(tmp_path / name).cuda().eval()
        with torch.no_grad():
            features = model.forward_features(tensors["input"].cuda()).cpu()
        assert (features - tensors["features"]).abs().max().item() < TOL, name


def test_head_dim_padding_is_exact_on_gpu():
    model = SwiFT(HEAD12, build_head("binary", HEAD12.num_features)).cuda().eval()
    x = torch.randn(2, 1, *HEAD12.img_size, device="cuda")
    with torch.no_grad():
        padded = model(x)
        for module in model.modules():
            if hasattr(module, "pad_head_dim"):
                module.pad_head_dim = False
        unpadded = model(x)
    assert torch.allclose(padded, unpadded, atol=1e-5)


def test_fused_kernels_run_in_bf16_training():
    """With the math backend forbidden, a bf16 training step must still run: every attention call
    (unmasked and masked) found a fused kernel."""
    model = SwiFT(HEAD12, build_head("binary", HEAD12.num_features)).cuda()
    x = torch.randn(2, 1, *HEAD12.img_size, device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().sum()
        loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_helpers_between_processes_work_on_an_nccl_group():
    """NCCL groups carry no CPU tensors: each helper the loops call between processes must still dispatch
    (a group of one process takes the same path as many)."""
    import torch.distributed as dist
    from fakes import free_port

    from neurox.train import distributed as dist_utils

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert dist_utils.all_reduce_flag(True) and not dist_utils.all_reduce_flag(False)
        assert dist_utils.all_gather_objects({"a": 1}) == [{"a": 1}]
        assert dist_utils.broadcast_object([1, 2]) == [1, 2]
        dist_utils.barrier()
    finally:
        dist.destroy_process_group()
