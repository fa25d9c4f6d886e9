"""DDP on CPU (gloo, 2 processes): a few optimizer steps give the parameters of one process that
sees the combined batch; and torchrun runs the pretraining CLI end to end."""
from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

from custom_datasets.masking import BlockwiseMaskGenerator
from engine_pretrain import train_one_epoch
from models import create_model
from models.modes import ImageMIM, ModeOptions
from tests.distributed_harness import run_in_processes, run_launched, torchrun
from tests.helpers import ROOT
from training.step import StepSettings

STEPS, BATCH, GRID, VOCAB = 3, 8, 4, 16
SETTINGS = StepSettings(lr=1e-3, min_lr=1e-5, warmup_epochs=0.5, epochs=2, clip_grad=0.5, print_freq=1000)


def _batches() -> list[dict[str, torch.Tensor]]:
    """Fixed batches; block masks with an exact count, so every rank's loss averages the same number
    of masked patches and DDP's gradient mean equals the combined-batch gradient."""
    import random

    random.seed(0)
    gen = torch.Generator().manual_seed(0)
    masker = BlockwiseMaskGenerator((GRID, GRID), 6, min_num_patches=2)
    return [{"image": torch.randn(BATCH, 3, GRID * 8, GRID * 8, generator=gen),
             "bool_masked_pos": torch.stack([torch.from_numpy(masker().reshape(-1)) for _ in range(BATCH)]),
             "visual_token_ids": torch.randint(0, VOCAB, (BATCH, GRID * GRID), generator=gen)}
            for _ in range(STEPS)]


def _task() -> ImageMIM:
    torch.manual_seed(0)
    backbone = create_model("vlmo_tiny_patch16", img_size=GRID * 8, patch_size=8, drop_path_rate=0.0)
    task = ImageMIM(backbone, ModeOptions(visual_vocab_size=VOCAB))
    for name, param in task.named_parameters():  # as main_pretrain_cook does: unused text path frozen
        param.requires_grad_(name not in set(task.frozen_parameter_names()))
    return task


def _train(model, task, batches) -> None:
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=SETTINGS.lr, weight_decay=0.05)
    train_one_epoch(model, batches, optimizer, torch.device("cpu"), 0, SETTINGS, lambda b: b, steps_per_epoch=STEPS)


def _ddp_worker(rank: int, world: int, out_path: str) -> None:
    task = _task()
    model = torch.nn.parallel.DistributedDataParallel(task)
    per_rank = BATCH // world
    shard = [{k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in b.items()} for b in _batches()]
    _train(model, task, shard)
    if rank == 0:
        torch.save(task.state_dict(), out_path)


def test_two_gloo_processes_match_one_process_on_the_combined_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    run_in_processes(_ddp_worker, 2, str(out))
    task = _task()
    initial = {k: v.clone() for k, v in task.state_dict().items()}
    _train(task, task, _batches())
    ddp = torch.load(out, weights_only=True)
    moved = 0
    for key, value in task.state_dict().items():
        # fp32; the two paths sum gradients in a different order: tolerance 1e-5
        assert torch.allclose(ddp[key], value, atol=1e-5, rtol=0), key
        moved += not torch.equal(value, initial[key])
    assert moved > 10  # the comparison is not between untrained models


def test_torchrun_two_processes_runs_the_cli(tmp_path):
    out = tmp_path / "run"
    cmd = [*torchrun(), str(ROOT / "main_pretrain_cook.py"), "--device", "cpu", "--model", "vlmo_tiny_patch16", "--image_size", "32",
           "--patch_size", "8", "--second_image_size", "16", "--visual_vocab_size", "16", "--tokenizer_fit_images", "64",
           "--batch_size", "4", "--num_workers", "0", "--epochs", "1", "--data_path", "synthetic", "--synthetic_train_size", "32",
           "--synthetic_val_size", "16", "--synthetic_render_size", "32", "--min_mask_patches_per_block", "4",
           "--output_dir", str(out)]
    result = run_launched(cmd, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 1 and 0 <= log[0]["test_acc_mim"] <= 1
    assert "2 process(es), effective batch 8" in result.stdout
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-0.pth"]  # rank 0 only


def test_torchrun_two_processes_fine_tune(tmp_path):
    from PIL import Image

    for split, n in (("train", 16), ("val", 8)):
        for c, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            folder = tmp_path / "data" / split / c
            folder.mkdir(parents=True)
            for i in range(n // 2):
                Image.new("RGB", (40, 40), tuple(max(0, v - 8 * i) for v in colour)).save(folder / f"{i}.png")
    out = tmp_path / "ft"
    cmd = [*torchrun(), str(ROOT / "main_finetune.py"), "--task", "image_classification", "--device", "cpu", "--data_path",
           str(tmp_path / "data"), "--input_size", "32", "--patch_size", "8", "--batch_size", "4", "--num_workers", "0",
           "--epochs", "1", "--warmup_epochs", "0.5", "--output_dir", str(out)]
    result = run_launched(cmd, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 1 and 0 <= log[0]["test_acc1"] <= 100
    assert (out / "checkpoint-best.pth").is_file()


def _regularized_train(model, task, batches, method_name: str) -> None:
    """Three steps with a continual method's penalty (weights-only l2, or per-batch distillation)."""
    import dataclasses

    from training.continual import CL_METHODS
    from tests.test_cl_methods import _stand_in_run

    method = CL_METHODS[method_name](None)
    method.start(_stand_in_run(task.backbone))
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=SETTINGS.lr, weight_decay=0.05)
    train_one_epoch(model, batches, optimizer, torch.device("cpu"), 0, dataclasses.replace(SETTINGS, reg_loss_weight=10.0),
                    lambda b: b, steps_per_epoch=STEPS, regularizer=method.penalty, batch_regularizer=method.batch_penalty)


def _regularized_ddp_worker(rank: int, world: int, out_path: str, method_name: str) -> None:
    task = _task()
    model = torch.nn.parallel.DistributedDataParallel(task)
    per_rank = BATCH // world
    shard = [{k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in b.items()} for b in _batches()]
    _regularized_train(model, task, shard, method_name)
    if rank == 0:
        torch.save(task.state_dict(), out_path)


@pytest.mark.parametrize("method_name", ["l2", "distill"])
def test_a_regularized_stage_on_two_processes_matches_one_process(tmp_path, method_name):
    """The penalty's gradient is the same on every rank (l2) or averaged like the loss's (distill,
    whose batch halves' mean equals the whole batch's), so DDP gives the one-process weights."""
    out = tmp_path / "ddp.pt"
    run_in_processes(_regularized_ddp_worker, 2, str(out), method_name)
    task = _task()
    initial = {k: v.clone() for k, v in task.state_dict().items()}
    _regularized_train(task, task, _batches(), method_name)
    ddp = torch.load(out, weights_only=True)
    for key, value in task.state_dict().items():
        assert torch.allclose(ddp[key], value, atol=1e-5, rtol=0), key
    assert sum(not torch.equal(v, initial[k]) for k, v in task.state_dict().items()) > 10
    plain = _task()
    _train(plain, plain, _batches())
    assert any((v - plain.state_dict()[k]).abs().max() > 1e-6 for k, v in task.state_dict().items())  # the penalty acted


def test_the_launcher_harness_reruns_a_native_crash_once_and_nothing_else(tmp_path):
    """run_launched's one rerun: after torchrun's SIGSEGV report, from an emptied --output_dir;
    never after an ordinary failure, and a second crash is returned as it is."""
    crash_then_pass = ("import pathlib, sys; out = pathlib.Path(sys.argv[2]); seen = (out / 'seen').exists(); "
                       "out.mkdir(exist_ok=True); (out / 'seen').touch(); "
                       "sys.exit(0 if seen else 'Signal 11 (SIGSEGV) received by PID 1')")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="crashed below Python; rerunning once"):
        assert run_launched([sys.executable, "-c", crash_then_pass, "--output_dir", str(out)], timeout=60).returncode == 1
    # the rerun found an emptied folder, so it crashed again, and that is what came back
    ordinary = "import sys; sys.exit('error: a bad flag')"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary failure is not rerun, so no warning
        assert run_launched([sys.executable, "-c", ordinary], timeout=60).returncode == 1
