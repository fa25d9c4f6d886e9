"""`main_finetune.py --fsdp` with 2 gloo processes: after 3 steps its checkpoint-best holds the
same weights and optimizer state as a DDP run's (1e-5); one process reads it and evaluates it to
the run's own accuracy; and the flags --fsdp cannot go with are refused in one sentence."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from common.errors import UserError
from tests.distributed_harness import run_in_processes, run_launched, torchrun
from tests.helpers import ROOT
from training.cli import finetune_config_from_argv

TRAIN_PER_CLASS, BATCH, WORLD = 12, 4, 2  # 24 images = 3 steps of 4 per process


def _image_folder(root):
    from PIL import Image

    for split, n in (("train", TRAIN_PER_CLASS), ("val", 4)):
        for c, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 40), tuple(max(0, v - 8 * i) for v in colour)).save(folder / f"{i}.png")
    return root


def _finetune(data, out, *extra: str, processes: int = WORLD, task: tuple[str, ...] = ()) -> dict:
    """main_finetune.py on a tiny model; `task`: the task's flags (default: image classification of `data`)."""
    launch = torchrun(processes) if processes > 1 else [sys.executable]
    task = task or ("--task", "image_classification", "--data_path", str(data), "--model_selection_fraction", "0")
    cmd = [*launch, str(ROOT / "main_finetune.py"), *task, "--device", "cpu", "--input_size", "32", "--patch_size", "8",
           "--batch_size", str(BATCH), "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0.5",
           "--drop_path", "0", "--output_dir", str(out), *extra]
    result = run_launched(cmd, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_fsdp_finetuning_matches_ddp_and_loads_into_one_process(tmp_path):
    data = _image_folder(tmp_path / "data")
    _finetune(data, tmp_path / "ddp")
    _finetune(data, tmp_path / "fsdp", "--fsdp")
    ddp = torch.load(tmp_path / "ddp" / "checkpoint-best.pth", weights_only=True)
    fsdp = torch.load(tmp_path / "fsdp" / "checkpoint-best.pth", weights_only=True)
    assert fsdp["model"].keys() == ddp["model"].keys() and len(ddp["model"]) > 20
    for key, value in ddp["model"].items():
        assert torch.allclose(fsdp["model"][key], value, atol=1e-5, rtol=0), key
    # the optimizer state too, in the same position-keyed layout: 3 AdamW steps on every parameter
    assert fsdp["optimizer"]["param_groups"] == ddp["optimizer"]["param_groups"]
    assert fsdp["optimizer"]["state"].keys() == ddp["optimizer"]["state"].keys()
    moved = 0
    for index, state in ddp["optimizer"]["state"].items():
        assert float(state["step"]) == 3 == float(fsdp["optimizer"]["state"][index]["step"])
        moved += bool(state["exp_avg"].abs().sum() > 0)
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(fsdp["optimizer"]["state"][index][name], state[name], atol=1e-5, rtol=0)
    assert moved > 20  # the weights were trained, not merely copied
    logs = {run: json.loads((tmp_path / run / "log.txt").read_text().splitlines()[-1]) for run in ("ddp", "fsdp")}
    assert abs(logs["fsdp"]["train_loss"] - logs["ddp"]["train_loss"]) < 1e-4
    assert logs["fsdp"]["test_acc1"] == logs["ddp"]["test_acc1"]
    # the gathered checkpoint is one ordinary file: one process, no sharding, evaluates it to the same figure
    evaluated = _finetune(data, tmp_path / "eval", "--eval", "--finetune", str(tmp_path / "fsdp" / "checkpoint-best.pth"),
                          processes=1)
    assert f"acc1 {logs['fsdp']['test_acc1']:.2f}" in evaluated.stdout + evaluated.stderr


def _segmentation_flags(root) -> tuple[str, ...]:
    from custom_datasets.synthetic_segmentation import write_synthetic_segmentation

    data = write_synthetic_segmentation(root / "segmentation", 24, 8, size=32)
    return ("--task", "semantic_segmentation", "--data_path", str(data), "--decoder_channels", "16",
            "--aux_channels", "8")


def _retrieval_flags(root) -> tuple[str, ...]:
    from custom_datasets.pair_data import caption_texts
    from models.text_tokenizer import train_wordpiece
    from tests.test_retrieval_finetune import synthetic_pairs

    (root / "pairs").mkdir()
    train_wordpiece(caption_texts(["synthetic"], 500, 0), 200, root / "tok")
    return ("--task", "image_text_retrieval", "--data_file_path", str(synthetic_pairs(root / "pairs", 32, seed=3)),
            "--tokenizer", str(root / "tok"))


@pytest.mark.slow  # the suite's time; the default suite checks the buffer sharing itself (below)
@pytest.mark.parametrize("flags, metric", [(_segmentation_flags, "mIoU"), (_retrieval_flags, "itc_r_mean")])
def test_fsdp_runs_the_tasks_that_evaluate_outside_the_forward(tmp_path, flags, metric):
    """Segmentation draws example predictions and retrieval embeds the whole held-out set through
    the model's parts: under FSDP every rank takes part, the weights are DDP's, and both report
    what one process evaluating the checkpoint reports (segmentation's BatchNorm statistics are
    rank 0's on every rank, as in the checkpoint)."""
    task = flags(tmp_path)
    _finetune(None, tmp_path / "ddp", task=task)
    _finetune(None, tmp_path / "fsdp", "--fsdp", task=task)
    logs = {run: json.loads((tmp_path / run / "log.txt").read_text().splitlines()[-1]) for run in ("ddp", "fsdp")}
    assert abs(logs["fsdp"]["train_loss"] - logs["ddp"]["train_loss"]) < 1e-4
    ddp = torch.load(tmp_path / "ddp" / "checkpoint-best.pth", weights_only=True)["model"]
    fsdp = torch.load(tmp_path / "fsdp" / "checkpoint-best.pth", weights_only=True)["model"]
    assert fsdp.keys() == ddp.keys()
    # segmentation's default lr is 13x classification's: reduce-scatter and all-reduce round apart more
    assert all(torch.allclose(fsdp[k], ddp[k], atol=1e-4, rtol=0) for k in ddp)
    assert abs(logs["fsdp"][f"test_{metric}"] - logs["ddp"][f"test_{metric}"]) < 1e-3
    evaluated = _finetune(None, tmp_path / "eval", "--eval", "--finetune", str(tmp_path / "fsdp" / "checkpoint-best.pth"),
                          processes=1, task=task)
    assert f"{metric} {logs['fsdp'][f'test_{metric}']:.3f}" in evaluated.stdout + evaluated.stderr


def _buffers_worker(rank: int, world: int, out_path: str) -> None:
    from training.fsdp import share_main_buffers

    norm = torch.nn.BatchNorm1d(3)
    norm(torch.randn(8, 3) + rank)  # each rank's running statistics follow its own batch
    share_main_buffers(norm)
    gathered = [torch.zeros(3) for _ in range(world)]
    torch.distributed.all_gather(gathered, norm.running_mean)
    if rank == 0:
        torch.save({"gathered": gathered, "rank0": norm.running_mean.clone()}, out_path)


def test_every_rank_evaluates_with_rank_0s_batchnorm_statistics(tmp_path):
    """No SyncBatchNorm on CPU: before evaluating, every rank takes rank 0's buffers (those the
    checkpoint holds), so the ranks' shares of the held-out set are judged by one model."""
    run_in_processes(_buffers_worker, WORLD, str(tmp_path / "buffers.pt"))
    saved = torch.load(tmp_path / "buffers.pt", weights_only=True)
    assert all(torch.equal(mean, saved["rank0"]) for mean in saved["gathered"])
    assert saved["rank0"].abs().sum() > 0


def test_fsdp_needs_torchrun_in_pretraining_and_finetuning(tmp_path, monkeypatch):
    """Without torchrun there is no process group to shard over: one sentence, not env://'s traceback."""
    from training.cli import pretrain_config_from_argv

    monkeypatch.delenv("RANK", raising=False)
    folders = _image_folder(tmp_path / "data")
    for parse, task in ((pretrain_config_from_argv, []), (finetune_config_from_argv, ["--task", "image_classification"])):
        with pytest.raises(UserError, match="--fsdp shards the model across the processes torchrun starts"):
            parse([*task, "--data_path", str(folders), "--fsdp", "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("extra, says", [(["--model_ema"], "--model_ema keeps a whole copy"),
                                         (["--task", "linear_probe"], "nothing to shard")])
def test_fsdp_refuses_what_would_undo_it(tmp_path, monkeypatch, extra, says):
    monkeypatch.setenv("RANK", "0")  # as torchrun would
    folders = _image_folder(tmp_path / "data")
    argv = ["--task", "image_classification", "--data_path", str(folders), "--fsdp", *extra]
    with pytest.raises(UserError, match=says):
        finetune_config_from_argv(argv)
