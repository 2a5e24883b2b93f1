"""Pretraining: the objectives and augmentations, many stores, FSDP2 across processes, resume, SIGTERM."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import OPTIONS, bids_run, bold, free_port, run_until_step_then_signal, subprocess_env
from safetensors.torch import load_file

from neurox.cli import main
from neurox.data.grid import TargetGrid
from neurox.data.prepare import prepare
from neurox.data.preprocess import PrepareOptions
from neurox.hub import HEAD_FILE
from neurox.train import ssl
from neurox.train.engine import consolidated_state

ENV = subprocess_env()  # for neurox subprocesses

# --- objectives ---------------------------------------------------------------------------------------


def test_nt_xent_equals_the_simclr_definition():
    torch.manual_seed(0)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / 0.1
    n = 5
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        losses.append(-sim[i, positive] + torch.logsumexp(sim[i, others], 0))
    assert torch.allclose(ssl.nt_xent(a, b, 0.1), torch.stack(losses).mean(), atol=1e-5)
    # perfectly aligned pairs with orthogonal negatives: loss near zero
    eye = torch.eye(5, 8)
    assert ssl.nt_xent(eye, eye, 0.1).item() < 1e-3


def _nt_xent_in_process(rank: int, init_file: str, a: torch.Tensor, b: torch.Tensor, out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mine_a = a[2 * rank:2 * rank + 2].clone().requires_grad_()
        mine_b = b[2 * rank:2 * rank + 2].clone().requires_grad_()
        loss = ssl.nt_xent(mine_a, mine_b, 0.1)
        loss.backward()
        torch.save({"loss": loss.detach(), "a": mine_a.grad, "b": mine_b.grad}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_nt_xent_across_two_processes_matches_the_whole_batch_with_its_gradients(tmp_path):
    torch.manual_seed(0)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    torch.multiprocessing.spawn(_nt_xent_in_process, args=(str(tmp_path / "init"), a, b, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole_a, whole_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    whole = ssl.nt_xent(whole_a, whole_b, 0.1)
    whole.backward()
    # every other process's rows are negatives: the mean of the two losses is the whole batch's loss,
    # and the mean of their gradients (what DDP and FSDP apply) is the whole batch's gradient
    assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), whole.detach(), atol=1e-6)
    assert torch.allclose(torch.cat([r["a"] for r in ranks]) / 2, whole_a.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["b"] for r in ranks]) / 2, whole_b.grad, atol=1e-6)


def test_local_temporal_positives_are_the_views_of_one_window():
    window_1, window_2 = torch.randn(3, 16), torch.randn(3, 16)
    aligned = torch.stack([window_1, window_1, window_2, window_2], dim=1)  # views equal within a window
    crossed = torch.stack([window_1, window_2, window_1, window_2], dim=1)  # positives from different windows
    assert ssl.local_temporal_loss(aligned).item() < ssl.local_temporal_loss(crossed).item()
    assert ssl.local_temporal_loss(aligned).item() < 0.05


def test_token_mask_hides_the_ratio_and_voxel_mask_follows_patches():
    hidden = ssl.token_mask(3, (4, 4, 4, 5), 0.6, torch.Generator().manual_seed(1))
    assert hidden.shape == (3, 4, 4, 4, 5) and (hidden.flatten(1).sum(1) == round(0.6 * 320)).all()
    assert not torch.equal(hidden[0], hidden[1])  # each sample its own mask
    voxels = ssl.voxel_mask(hidden, (2, 3, 2, 1))
    assert voxels.shape == (3, 1, 8, 12, 8, 5)
    assert torch.equal(voxels[:, 0, ::2, ::3, ::2, :], hidden)
    with pytest.raises(ValueError, match="mask ratio"):
        ssl.token_mask(1, (2, 2, 2, 1), 1.0)


def test_tube_mask_hides_the_same_places_in_every_frame():
    hidden = ssl.token_mask(2, (4, 4, 4, 5), 0.5, torch.Generator().manual_seed(1), shape="tube")
    assert hidden.shape == (2, 4, 4, 4, 5)
    assert (hidden == hidden[..., :1]).all()  # a hidden place is hidden in every frame
    assert (hidden[..., 0].flatten(1).sum(1) == 32).all() and not torch.equal(hidden[0], hidden[1])
    with pytest.raises(ValueError, match="mask shape"):
        ssl.token_mask(1, (2, 2, 2, 1), 0.5, shape="block")


def test_mim_decoder_puts_each_token_on_the_voxels_it_covers():
    decoder = ssl.MIMDecoder(in_features=6, patch_size=(2, 2, 2, 1), in_chans=1, upscale=2)
    features = torch.zeros(1, 6, 2, 3, 2, 4)
    features[0, :, 1, 2, 0, 3] = 1.0  # one last-stage token
    torch.nn.init.zeros_(decoder.proj.bias)
    out = decoder(features)
    assert out.shape == (1, 1, 8, 12, 8, 4)
    nonzero = out[0, 0].abs() > 0
    covered = torch.zeros_like(nonzero)
    covered[4:8, 8:12, 0:4, 3] = True  # token (1, 2, 0) covers 2 x 2 patches of 2 voxels per axis; frame 3
    assert torch.equal(nonzero, covered)


def test_mim_decoder_layers_let_a_token_inform_the_voxels_of_others():
    features = torch.randn(1, 32, 2, 3, 2, 4, generator=torch.Generator().manual_seed(0))
    changed = features.clone()
    changed[0, :, 1, 2, 0, 3] += 1.0  # one last-stage token, covering voxels [4:8, 8:12, 0:4] of frame 3
    elsewhere = torch.ones(1, 1, 8, 12, 8, 4, dtype=torch.bool)
    elsewhere[0, 0, 4:8, 8:12, 0:4, 3] = False
    for depth, mixes in ((0, False), (2, True)):
        torch.manual_seed(0)
        decoder = ssl.MIMDecoder(32, (2, 2, 2, 1), 1, upscale=2, grid=(2, 3, 2, 4), depth=depth).eval()
        with torch.no_grad():
            before, after = decoder(features), decoder(changed)
        assert before.shape == (1, 1, 8, 12, 8, 4)
        assert bool((before != after)[elsewhere].any()) == mixes
    with pytest.raises(ValueError, match="grid"):
        ssl.MIMDecoder(32, (2, 2, 2, 1), 1, upscale=2, depth=1)


def test_mim_loss_counts_hidden_voxels_inside_the_brain_only():
    target = torch.zeros(1, 1, 2, 2, 2, 1)
    reconstruction = torch.ones_like(target)
    hidden = torch.zeros_like(target, dtype=torch.bool)
    hidden[..., 0, :, :, :] = True
    brain = torch.zeros(1, 1, 2, 2, 2, 1, dtype=torch.bool)
    brain[..., 0, 0, :, :] = True
    reconstruction[..., 1, :, :, :] = 100.0  # visible: not counted
    assert ssl.mim_loss(reconstruction, target, hidden, brain).item() == pytest.approx(1.0)


def test_augment_returns_a_new_reproducible_tensor():
    x = torch.randn(2, 1, 12, 12, 12, 4)
    before = x.clone()
    a = ssl.augment(x, torch.Generator().manual_seed(3))
    b = ssl.augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(x, before) and torch.equal(a, b) and not torch.equal(a, x)
    same = ssl.augment(x, torch.Generator().manual_seed(3), rotate_deg=0, scale=0, shift_voxels=0, noise=0,
                       smooth_sigma=0)
    assert torch.allclose(same, x, atol=1e-4)  # the identity affine moves nothing
    # one affine for every frame: a static volume stays static after augmentation without noise
    static = torch.randn(1, 1, 12, 12, 12, 1).expand(1, 1, 12, 12, 12, 4).contiguous()
    moved = ssl.augment(static, torch.Generator().manual_seed(4), noise=0)
    assert torch.allclose(moved[..., 0], moved[..., 3], atol=1e-5) and not torch.allclose(moved, static)


# --- the command ---------------------------------------------------------------------------------------


def _make_store(root: Path, n: int, options: PrepareOptions = OPTIONS, seed: int = 0) -> Path:
    rows = ["participant_id\tgroup"]
    for i in range(n):
        bids_run(root / "bids", f"{i:02d}", data=bold(n_frames=40, seed=seed + i))
        rows.append(f"sub-{i:02d}\t{i % 2}")
    (root / "bids" / "participants.tsv").write_text("\n".join(rows) + "\n")
    assert prepare(root / "bids", root / "store", options, progress=False).ok
    return root / "store"


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    return (_make_store(tmp_path_factory.mktemp("a"), 6), _make_store(tmp_path_factory.mktemp("b"), 4, seed=50))


def pretrain_args(stores, out: Path, *extra: str) -> list[str]:
    store_args = [a for s in stores for a in ("--store", str(s))]
    return ["pretrain", *store_args, "--out", str(out), "--epochs", "1", "--batch_size", "2",
            "--loader_workers", "0", *extra]


@pytest.mark.parametrize("objective", [["--objective", "contrastive", "--contrastive_mode", "instance"],
                                       ["--objective", "contrastive", "--contrastive_mode", "local_temporal"],
                                       ["--objective", "mim", "--mask_ratio", "0.5"],
                                       ["--objective", "mim", "--mask_shape", "tube", "--decoder_depth", "1"]])
def test_pretrain_writes_a_model_that_finetune_takes(stores, tmp_path, objective):
    out = tmp_path / "pre"
    assert main(pretrain_args(stores, out, "--store_weight", "[1,3]", "--max_steps", "2", *objective)) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["input_contract"]["normalization"] == "global_zscore" and config["head"] is None
    assert config["input_contract"]["denoising"] == "none"  # what prepare regressed out, for --like
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    card = (out / "model" / "README.md").read_text()
    assert "self-supervised" in card and f"- final loss: {records[-1]['loss']:.4g}" in card
    run = tmp_path / "probe"
    assert main(["finetune", "--store", str(stores[0]), "--target", "group", "--out", str(run), "--epochs", "1",
                 "--batch_size", "2", "--n_boot", "20", "--loader_workers", "0", "--init", str(out / "model"),
                 "--freeze", "true"]) == 0
    backbone = load_file(str(out / "model" / "model.safetensors"))
    probed = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.equal(backbone[k], probed[k]) for k in backbone)  # frozen: the backbone is unchanged


def test_fine_tuning_a_pretrained_backbone_at_a_fraction_of_the_learning_rate(stores, tmp_path, capsys):
    """--backbone_lr_scale: the head trains at --lr, the backbone at that fraction of it (0: not at all)."""
    out = tmp_path / "pre"
    assert main(pretrain_args(stores, out, "--max_steps", "1", "--objective", "mim")) == 0
    backbone = load_file(str(out / "model" / "model.safetensors"))

    def finetune(name: str, *extra: str) -> tuple[dict, dict]:
        run = tmp_path / name
        assert main(["finetune", "--store", str(stores[0]), "--target", "group", "--out", str(run), "--epochs", "1",
                     "--batch_size", "2", "--n_boot", "20", "--loader_workers", "0", "--lr", "1e-3",
                     "--init", str(out / "model"), *extra]) == 0
        return load_file(str(run / "model" / "model.safetensors")), load_file(str(run / "model" / HEAD_FILE))

    _, initial_head = finetune("untrained", "--lr", "0")
    still, head = finetune("still", "--backbone_lr_scale", "0")
    assert all(torch.equal(backbone[k], still[k]) for k in backbone)
    assert not all(torch.equal(initial_head[k], head[k]) for k in head)  # the head did train
    slower, _ = finetune("slower", "--backbone_lr_scale", "0.1")
    assert not all(torch.equal(backbone[k], slower[k]) for k in backbone)
    assert main(["finetune", "--store", str(stores[0]), "--target", "group", "--out", str(tmp_path / "x"),
                 "--init", str(out / "model"), "--freeze", "true", "--backbone_lr_scale", "0.1"]) == 1
    assert "no effect with --freeze" in capsys.readouterr().err


def test_weighted_sampling_follows_the_weights(stores):
    from neurox.data.store import Store
    from neurox.train.pretrain import ParticipantPairs, epoch_items

    data = ParticipantPairs([Store(s) for s in stores], 20, (48, 48, 48), seed=0)
    items = epoch_items(data, [1.0, 3.0], seed=0, epoch=0, per_epoch=4000)
    share = np.mean([s == 1 for s, _ in items])
    assert abs(share - 0.75) < 0.03
    assert epoch_items(data, None, 0, 0, None) != epoch_items(data, None, 0, 1, None)  # reshuffled per epoch
    assert sorted(epoch_items(data, None, 0, 0, None)) == data.participants()  # everyone once
    data.items = items[:1]
    pair, brain, _ = data[0]
    assert pair.shape == (2, 1, 20, 48, 48, 48) and brain.dtype == torch.bool and brain.any()


def test_stores_with_different_contracts_are_refused_in_one_line(stores, tmp_path, capsys):
    other = _make_store(tmp_path, 2, PrepareOptions(grid=TargetGrid.default(4.0), min_frames=8,
                                                    normalization="voxel_zscore"))
    assert main(pretrain_args([stores[0], other], tmp_path / "pre")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "normalization" in err and str(other) in err
    denoised = tmp_path / "denoised"  # the same frames, said to be denoised: one contract key differs
    shutil.copytree(stores[1], denoised)
    info = json.loads((denoised / "store.json").read_text())
    (denoised / "store.json").write_text(json.dumps({**info, "denoising": "simple"}))
    assert main(pretrain_args([stores[0], denoised], tmp_path / "pre")) == 1
    assert "has denoising simple but" in capsys.readouterr().err
    assert main(pretrain_args([stores[0]], tmp_path / "pre", "--store_weight", "[1,2]")) == 1
    assert "one non-negative weight per store" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(stores, tmp_path, capsys):
    out = tmp_path / "pre"
    assert main(pretrain_args(stores, out, "--objective", "mim", "--lr", "1e30", "--clip_grad", "0",
                              "--warmup_fraction", "0", "--checkpoint_every", "1", "--epochs", "3")) == 1
    err = capsys.readouterr().err
    assert "at step" in err and "batch participants: sub-" in err and "last good checkpoint" in err
    assert consolidated_state(out / "checkpoints" / "last")["step"] >= 1  # loadable


# --- processes -------------------------------------------------------------------------------------------


def test_fsdp_on_two_processes_resumes_on_one_with_the_same_weights(stores, tmp_path):
    two = tmp_path / "two"
    args = pretrain_args(stores[:1], two, "--strategy", "fsdp", "--batch_size", "1", "--epochs", "10",
                         "--max_steps", "3", "--checkpoint_every", "3", "--device", "cpu", "--augment", "false")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "neurox.cli", *args], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    state = consolidated_state(two / "checkpoints" / "last")
    assert state["step"] == 3 and state["world_size"] == 2
    saved = load_file(str(two / "model" / "model.safetensors"))
    assert all(torch.equal(state["model"][f"backbone.{k}"], v) for k, v in saved.items())
    # the same run resumed on one process: the sharded checkpoint loads into the whole model
    (two / "model" / "model.safetensors").unlink()
    resumed = subprocess.run([sys.executable, "-m", "neurox.cli", *args, "--resume", "true"], env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed" in resumed.stdout and "at step 3" in resumed.stdout
    again = load_file(str(two / "model" / "model.safetensors"))
    assert all(torch.equal(saved[k], again[k]) for k in saved)
    # and it trains on from there
    more = subprocess.run([sys.executable, "-m", "neurox.cli", *args[:-6], "--max_steps", "4", "--resume", "true",
                           "--checkpoint_every", "3", "--device", "cpu", "--augment", "false"],
                          env=ENV, capture_output=True, text=True)
    assert more.returncode == 0, more.stderr[-2000:]
    assert consolidated_state(two / "checkpoints" / "last")["step"] == 4


@pytest.mark.parametrize("signum,name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C (SIGINT)")])
def test_a_signal_mid_run_leaves_a_loadable_checkpoint(stores, tmp_path, signum, name):
    """SIGTERM from a cluster, or a first Ctrl-C at a terminal: the step finishes, a checkpoint is written."""
    out = tmp_path / "pre"
    args = pretrain_args(stores, out, "--epochs", "50", "--objective", "mim")
    returncode, stdout = run_until_step_then_signal(args, out, step=1, signum=signum)
    assert returncode == 0 and f"stopped by {name} at step" in stdout
    state = consolidated_state(out / "checkpoints" / "last")
    assert 1 <= state["step"] < 250 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_transfer_benchmark_pairs_each_pretrained_run_with_its_scratch_run(tmp_path):
    """benchmarks/pretrain_transfer.py: the step at which a pretrained run first reaches the best
    validation score of the scratch run of the same fine-tuning seed (NaN epochs ignored, None when
    never), and a job whose dependency failed is skipped rather than run."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from pretrain_transfer import Jobs, summarise_finetuning

    curves = {"scratch-ft0": [float("nan"), 0.6, 0.8, 0.7], "mim0-ft0": [0.5, 0.85, 0.9, 0.9],
              "mim1-ft0": [0.5, 0.6, 0.7, 0.75], "scratch-ft1": [0.5, 0.9, 0.6, 0.6], "mim0-ft1": [0.7, 0.8, 0.9, 0.95]}
    from neurox.data.loader import Target
    from neurox.train.metrics import auroc
    from neurox.train.runs import prediction_rows, write_predictions

    target, rng = Target("group", "binary", classes=["0", "1"]), np.random.default_rng(0)
    people = [f"sub-{i:02d}" for i in range(30)]
    truth = {p: [str(i % 2)] for i, p in enumerate(people)}
    runs, tested = {}, {}
    for name, values in curves.items():
        run = runs[name] = tmp_path / name
        run.mkdir()
        records = [{"step": 10 * (i + 1), "epoch": i, "val": {"auroc": v}} for i, v in enumerate(values)]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
        (run / "metrics.json").write_text(json.dumps({"test": {"auroc": values[-1]}}))
        (run / "targets.json").write_text(json.dumps({"targets": [target.to_dict()]}))
        tested[name] = np.array([[int(truth[p][0]) + rng.normal(0, 1.5)] for p in people])
        write_predictions(run / "predictions.tsv", [target], prediction_rows([target], truth, "test", people,
                                                                             tested[name]))
    out = summarise_finetuning(runs)["runs"]
    labels = np.array([int(truth[p][0]) for p in people])  # the test scores, paired with the scratch run's
    expected = auroc(labels, tested["mim0-ft0"][:, 0]) - auroc(labels, tested["scratch-ft0"][:, 0])
    assert out["mim0-ft0"]["test_minus_scratch"]["auroc_diff"] == pytest.approx(expected, abs=1e-4)
    assert {"auroc_diff_ci_low", "auroc_diff_p"} <= set(out["mim1-ft0"]["test_minus_scratch"])
    assert out["scratch-ft0"]["val_per_epoch"][0] == (20, 0.6)
    assert out["mim0-ft0"]["scratch_best_val"] == 0.8 and out["mim0-ft0"]["scratch_first_step_at_best"] == 30
    assert out["mim0-ft0"]["first_step_reaching_scratch_best"] == 20
    assert out["mim1-ft0"]["first_step_reaching_scratch_best"] is None
    assert out["mim0-ft1"]["scratch_best_val"] == 0.9 and out["mim0-ft1"]["first_step_reaching_scratch_best"] == 30

    done = []
    jobs = Jobs(tmp_path, parallel=2, on_done=done.append)
    jobs.add("fails", [sys.executable, "-c", "raise SystemExit(3)"])
    jobs.add("works", [sys.executable, "-c", "print('hello')"])
    jobs.add("needs-fails", [sys.executable, "-c", "print('never')"], after=["fails"])
    jobs.add("needs-works", [sys.executable, "-c", "print('after')"], after=["works"])
    jobs.run()
    assert jobs.status == {"fails": "failed (exit 3)", "works": "ok", "needs-fails": "skipped (fails did not succeed)",
                           "needs-works": "ok"}
    assert sorted(done) == ["fails", "needs-works", "works"]
    assert "after" in (tmp_path / "needs-works.txt").read_text()


def test_transfer_manifests_name_absolute_paths_from_a_relative_cohort(tmp_path, monkeypatch):
    """benchmarks/pretrain_transfer.py --out relative/dir: the manifests must not name paths relative to
    the working directory, since ``neurox prepare`` reads relative paths from the manifest's folder."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from pretrain_transfer import write_manifests

    from neurox.io.bids import read_manifest

    for i in range(1, 5):
        func = tmp_path / "work" / "cohort" / f"sub-{i:02d}" / "func"
        func.mkdir(parents=True)
        for kind in ("preproc_bold", "brain_mask"):
            (func / f"sub-{i:02d}_task-rest_run-1_desc-{kind}.nii.gz").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    halves = {"pretrain": Path("work/pretrain.tsv"), "heldout": Path("work/heldout.tsv")}
    write_manifests(Path("work/cohort"), halves)
    for half, expected in zip(halves.values(), (["sub-01", "sub-02"], ["sub-03", "sub-04"])):
        rows = read_manifest(half)
        assert [r.participant_id for r in rows] == expected
        assert all(r.bold.is_file() and r.mask.is_file() for r in rows)


def test_heldout_probe_benchmark_scores_both_readouts_against_random_backbones(stores, tmp_path):
    """benchmarks/probe_heldout.py: every backbone is probed with mean and statistics pooling on the same
    folds, and a named backbone is compared with the random ones readout by readout."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from pretrain_probe import random_model

    other = random_model(tmp_path / "other", 7, "demo")
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "probe_heldout.py"),
                    "--store", str(stores[0]), "--model", f"other={other}", "--random", "0", "1", "--targets", "group",
                    "--folds", "2", "--repeats", "2", "--work", str(tmp_path / "work"), "--tokens", "--input",
                    "--out", str(out)],
                   check=True, env=ENV, capture_output=True)
    backbones = json.loads(out.read_text())["backbones"]
    assert set(backbones) == {f"{b}{view}" for b in ("other", "random-0", "random-1")
                              for view in ("", "/mean_std", "/tokens", "/tokens_lagged")} | {
                               f"input/{view}" for view in ("tokens", "tokens_lagged", "patches")}
    assert all(len(b["scores"]["group"]) == 2 and all(0 <= s <= 1 for s in b["scores"]["group"])
               for b in backbones.values())
    for view in ("", "/mean_std"):  # the paired difference is to the random backbones' same readout
        randoms = [np.mean(backbones[f"random-{s}{view}"]["scores"]["group"]) for s in (0, 1)]
        mine = np.mean(backbones[f"other{view}"]["scores"]["group"])
        assert backbones[f"other{view}"]["minus_random"]["group"] == pytest.approx(mine - np.mean(randoms), abs=1e-3)
    # per-position statistics: averaged over the positions, their means are the pooled mean readout
    from probe_heldout import lead_lag, stage_embeddings

    from neurox.analysis.embed import load_model
    from neurox.data.loader import prepared_runs
    from neurox.data.store import Store

    model, _ = load_model(other)
    store = Store(stores[0])
    first = sorted(prepared_runs(store)[0])[0]
    views = stage_embeddings(model.eval(), store, [first], 2, tokens=True, token_stages=(2, 3))[first]
    channels, positions = model.num_features, 8  # the demo architecture's last stage: 2 x 2 x 2
    assert views["tokens"].shape == (2 * channels * positions,)
    assert np.array_equal(views["tokens-stage-3"], views["tokens"])  # the last stage, asked for by number
    assert views["tokens-stage-2"].shape == (2 * 48 * 4**3,)  # before its merging: 4 x 4 x 4 positions of 48
    means = views["tokens"][: channels * positions].reshape(channels, positions)
    assert np.allclose(means.mean(1), views["last"], atol=1e-5)
    assert views["tokens_lagged"].shape == (channels * positions * (positions - 1) // 2,)
    # the time-directed readout: its sign says which of two positions leads
    signal = np.random.default_rng(0).standard_normal((3, 1, 1, 21))
    first_leads = np.concatenate([signal[..., 1:], signal[..., :-1]], axis=2)  # position 1 is position 0 a frame later
    assert lead_lag(first_leads)[0] > 0 > lead_lag(first_leads[:, :, ::-1])[0]


def test_heldout_probe_input_reference_is_the_windows_own_statistics(stores):
    """probe_heldout --input: per-position and per-patch statistics of the model input itself, over the
    same windows the backbones embed (the reference a backbone's readout is compared with)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from probe_heldout import input_statistics

    from neurox.config import preset
    from neurox.data.loader import prepared_runs, run_windows, window_batches
    from neurox.data.store import Store

    store, config = Store(stores[0]), preset("demo")
    runs = prepared_runs(store)[0]
    first = sorted(runs)[0]
    views = input_statistics(store, [first], config, 2, token_stages=(1, 2))[first]
    length, grid = config.img_size[3], config.img_size[:3]
    x = np.concatenate([b.numpy() for _, b in window_batches(store, run_windows(store, runs[first], length), length,
                                                            grid, 2, torch.device("cpu"))])  # (W, 1, X, Y, Z, T)
    assert views["tokens"].shape == (2 * 8,) and views["patches"].shape == (2 * 8**3,)  # 2^3 positions, 8^3 patches
    assert views["tokens_lagged"].shape == (8 * 7 // 2,)
    assert np.allclose(views["patches"][: 8**3].mean(), x.mean(), atol=1e-5)
    corner = x[:, 0, :6, :6, :6, :].mean(axis=(1, 2, 3))  # the first patch's spatial mean, per window and frame
    assert np.isclose(views["patches"][0], corner.mean(), atol=1e-5)
    assert np.isclose(views["patches"][8**3], corner.std(), atol=1e-5)
    left = x[:, 0, :24, :24, :24, :].mean(axis=(1, 2, 3))  # the first last-stage position
    assert np.isclose(views["tokens"][8], left.std(), atol=1e-5)
    assert "tokens-stage-1" not in views  # stage 1's positions are the patches
    assert views["tokens-stage-2"].shape == (2 * 4**3,)
    corner = x[:, 0, :12, :12, :12, :].mean(axis=(1, 2, 3))  # the first stage-2 position: 12^3 voxels
    assert np.isclose(views["tokens-stage-2"][4**3], corner.std(), atol=1e-5)
