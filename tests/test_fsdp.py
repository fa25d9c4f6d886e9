"""FSDP (torch's fully_shard) on CPU with 2 gloo processes: the same weights as DDP after 3 steps
(1e-5), with activation checkpointing too; its checkpoint is one ordinary file that
`create_model` loads in one process and that resumes under DDP; and torchrun runs the CLI with
--fsdp end to end (stage report and pictures included)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from models import create_model
from tests.distributed_harness import run_in_processes, run_launched, torchrun
from tests.helpers import ROOT
from tests.test_distributed_pretrain import BATCH, STEPS, _batches, _task, _train


def _fsdp_worker(rank: int, world: int, out_path: str, checkpointing: bool) -> None:
    from training.fsdp import gathered_state, shard

    task = _task()
    task.backbone.set_grad_checkpointing(checkpointing)
    shard(task, task.backbone.blocks)
    per_rank = BATCH // world
    _train(task, task, [{k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in b.items()} for b in _batches()])
    state, _ = gathered_state(task)
    if rank == 0:
        torch.save(state, out_path)


def _ddp_worker(rank: int, world: int, out_path: str) -> None:
    task = _task()
    model = torch.nn.parallel.DistributedDataParallel(task)
    per_rank = BATCH // world
    _train(model, task, [{k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in b.items()} for b in _batches()])
    if rank == 0:
        torch.save(task.state_dict(), out_path)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fsdp_and_ddp_reach_the_same_weights(tmp_path, checkpointing):
    run_in_processes(_fsdp_worker, 2, str(tmp_path / "fsdp.pt"), checkpointing)
    run_in_processes(_ddp_worker, 2, str(tmp_path / "ddp.pt"))
    fsdp, ddp = torch.load(tmp_path / "fsdp.pt", weights_only=True), torch.load(tmp_path / "ddp.pt", weights_only=True)
    initial = _task().state_dict()
    assert fsdp.keys() == ddp.keys()
    moved = 0
    for key in ddp:
        assert torch.allclose(fsdp[key], ddp[key], atol=1e-5, rtol=0), key
        moved += not torch.equal(ddp[key], initial[key])
    assert moved > 10 and STEPS == 3


def _differently_seeded_worker(rank: int, world: int, out_path: str) -> None:
    from training.fsdp import gathered_state, shard

    torch.manual_seed(rank)  # as runs seed: seed + rank
    backbone = create_model("vlmo_tiny_patch16", img_size=32, patch_size=8)
    initial = {k: v.clone() for k, v in backbone.state_dict().items()}
    shard(backbone, backbone.blocks)
    state, _ = gathered_state(backbone)
    if rank == 0:
        torch.save({"initial": initial, "sharded": state}, out_path)


def test_sharding_starts_every_rank_from_rank_0s_weights(tmp_path):
    """Ranks initialise from different seeds; DDP broadcasts rank 0's weights, and so must FSDP, or
    the sharded model is a patchwork of every rank's random init (a from-scratch run differed from
    DDP by 0.1 in every weight)."""
    run_in_processes(_differently_seeded_worker, 2, str(tmp_path / "state.pt"))
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert saved["sharded"].keys() == saved["initial"].keys()
    for key, value in saved["initial"].items():
        assert torch.equal(saved["sharded"][key], value), key


def _cli(out, *extra: str) -> list[str]:
    mode = extra[extra.index("--exp_name") + 1] if "--exp_name" in extra else "image_mim"
    tokens = ["--visual_vocab_size", "16", "--tokenizer_fit_images", "64", "--min_mask_patches_per_block", "4"]
    return [*torchrun(), str(ROOT / "main_pretrain_cook.py"), "--device", "cpu", "--model", "vlmo_tiny_patch16", "--image_size", "32",
            "--patch_size", "8", "--second_image_size", "16", "--batch_size", "4", "--num_workers", "0", "--data_path",
            "synthetic", "--synthetic_train_size", "32", "--synthetic_val_size", "16", "--synthetic_render_size", "32",
            "--save_per_epochs", "1", "--output_dir", str(out), *(tokens if mode in ("image_mim", "compound_pretrain") else []),
            *extra]


def _run(cmd):
    result = run_launched(cmd, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_torchrun_fsdp_writes_one_checkpoint_that_loads_and_resumes_anywhere(tmp_path):
    from models import create_model
    from models.checkpoints import read_model_checkpoint

    out = tmp_path / "fsdp"
    result = _run(_cli(out, "--epochs", "1", "--fsdp", "--grad_checkpointing"))
    assert "stage report (image_mim)" in result.stdout and (out / "pictures" / "mim_reconstructions.png").is_file()
    ckpt = read_model_checkpoint(str(out / "checkpoint-0.pth"))
    backbone = create_model(None, pretrained=str(out / "checkpoint-0.pth"), checkpoint=ckpt)  # one process, no sharding
    assert torch.equal(backbone.patch_embed.proj.weight, ckpt.model["backbone.patch_embed.proj.weight"])
    assert not any(type(v).__name__ == "DTensor" for v in ckpt.model.values())
    saved = ckpt.extra["optimizer"]  # keyed by position, as optimizer.state_dict() is, every parameter stepped
    assert sorted(saved["state"]) == sorted(i for group in saved["param_groups"] for i in group["params"])
    # the sharded run's checkpoint resumes under FSDP and, as an ordinary file, under DDP
    for name, flags in (("fsdp", ["--fsdp"]), ("ddp", [])):
        resumed = tmp_path / f"resumed_{name}"
        result = _run(_cli(resumed, "--epochs", "2", "--resume", str(out / "checkpoint-0.pth"), *flags))
        assert "resuming run from" in result.stdout
        log = [json.loads(line) for line in (resumed / "log.txt").read_text().splitlines()]
        assert [entry["epoch"] for entry in log] == [1]


def test_torchrun_fsdp_trains_itc_whose_logit_scale_fully_shard_cannot_shard(tmp_path):
    """ITC's logit scale is a 0-d parameter, which fully_shard refuses: it stays whole on every
    rank with its gradient averaged over them, so the ranks agree on it and it is trained."""
    from custom_datasets.pair_data import caption_texts
    from models.checkpoints import read_model_checkpoint
    from models.text_tokenizer import train_wordpiece

    train_wordpiece(caption_texts(["synthetic"], 500, 0), 200, tmp_path / "tok")
    out = tmp_path / "itc"
    result = _run(_cli(out, "--exp_name", "image_text_itc", "--tokenizer", str(tmp_path / "tok"), "--epochs", "1",
                       "--fsdp", "--lr", "1e-2"))
    assert "stage report (image_text_itc)" in result.stdout
    scale = read_model_checkpoint(str(out / "checkpoint-0.pth")).model["itc_head.logit_scale"]
    assert scale.ndim == 0 and abs(scale.item() - math.log(1 / 0.07)) > 1e-3  # trained away from its init


@pytest.mark.slow  # two torchrun runs of 2 processes
def test_mae_trains_under_fsdp_and_ddp_to_the_same_weights(tmp_path):
    """image_mae's visible-only encoder and its decoder head, sharded (FSDP2) and replicated (DDP)."""
    from models.checkpoints import read_model_checkpoint

    for sharding in ("--fsdp", None):
        out = tmp_path / (sharding or "ddp").strip("-")
        _run(_cli(out, "--exp_name", "image_mae", "--epochs", "1", "--drop_path", "0", *([sharding] if sharding else [])))
    fsdp, ddp = (read_model_checkpoint(str(tmp_path / name / "checkpoint-0.pth")).model for name in ("fsdp", "ddp"))
    assert "mae_decoder.decoder_pred.weight" in fsdp and fsdp.keys() == ddp.keys()
    assert max((fsdp[k].float() - ddp[k].float()).abs().max().item() for k in fsdp) < 1e-5


def test_fsdp_refuses_only_a_lora_stages_fisher_estimate(tmp_path, monkeypatch):
    """Regularized stages and a full stage's Fisher estimate run sharded
    (tests/test_fsdp_continual.py); a LoRA stage's Fisher is of its merged weights, whose gradients
    FSDP never makes."""
    from common.errors import UserError
    from training.cli import pretrain_config_from_argv

    monkeypatch.setenv("RANK", "0")  # as under torchrun (without it --fsdp is refused first)
    flags = ["--exp_name", "text_mlm", "--data_path", "synthetic", "--fisher_samples", "64", "--fsdp",
             "--output_dir", str(tmp_path / "o")]
    with pytest.raises(UserError, match="--fisher_samples of a LoRA stage is the Fisher information of its merged"):
        pretrain_config_from_argv([*flags, "--lora_rank", "4", "--self_regularization"])
    pretrain_config_from_argv(flags)
    pretrain_config_from_argv([*flags[:4], *flags[6:], "--lora_rank", "4", "--self_regularization"])


def _run_weights(path):
    """(model tensors, the rest) of a run checkpoint; a sharded folder's optimizer state, which
    reading leaves in its shards until a resume needs it, read whole here to compare."""
    from pathlib import Path

    from common.sharded_checkpoint import OPTIMIZER_SHARDS, read_shards
    from models.checkpoints import read_model_checkpoint

    ckpt = read_model_checkpoint(str(path))
    if OPTIMIZER_SHARDS in ckpt.extra:
        ckpt.extra["optimizer"] = read_shards(Path(ckpt.extra[OPTIMIZER_SHARDS]))[1]
    return ckpt.model, ckpt.extra


@pytest.mark.slow  # 34 s; the other FSDP tests stay in the default suite
def test_sharded_checkpoints_hold_what_the_gathered_file_holds_and_load_anywhere(tmp_path):
    from models import create_model

    gathered, sharded = tmp_path / "gathered", tmp_path / "sharded"
    _run(_cli(gathered, "--epochs", "1", "--fsdp"))
    result = _run(_cli(sharded, "--epochs", "1", "--fsdp", "--sharded_checkpoint"))
    folder = sharded / "checkpoint-0.pth"
    assert "(sharded)" in result.stdout and folder.is_dir()
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per process
    assert not list(sharded.glob(".*.tmp"))
    # read in this one process, with no process group: the same tensors and optimizer state as the gathered file
    (model_g, extra_g), (model_s, extra_s) = _run_weights(gathered / "checkpoint-0.pth"), _run_weights(folder)
    assert model_s.keys() == model_g.keys()
    for key in model_g:
        assert torch.equal(model_s[key], model_g[key]), key
    opt_g, opt_s = extra_g["optimizer"], extra_s["optimizer"]
    assert opt_s["param_groups"] == opt_g["param_groups"] and opt_s["state"].keys() == opt_g["state"].keys()
    for i, values in opt_g["state"].items():
        for name, value in values.items():
            assert torch.equal(opt_s["state"][i][name], value), (i, name)
    assert (extra_s["epoch"], extra_s["step"]) == (extra_g["epoch"], extra_g["step"]) == (0, 4)
    differs = {k for k in extra_g["args"] if extra_s["args"][k] != extra_g["args"][k]}
    assert differs == {"output_dir", "log_dir", "d_vae_weight_path", "sharded_checkpoint"}, differs  # paths in the folder
    from models.checkpoints import read_model_checkpoint

    assert "optimizer" not in read_model_checkpoint(str(folder)).extra  # the readers of weights leave it in the shards
    backbone = create_model(None, pretrained=str(folder))  # fine-tuning and export start from it as from a file
    assert torch.equal(backbone.patch_embed.proj.weight, model_g["backbone.patch_embed.proj.weight"])
    # resumed under DDP as a file would be, and in its own folder under FSDP after a kill mid-write of epoch 1
    resumed = tmp_path / "resumed_ddp"
    result = _run(_cli(resumed, "--epochs", "2", "--resume", str(folder)))
    assert "resuming run from" in result.stdout
    assert [json.loads(line)["epoch"] for line in (resumed / "log.txt").read_text().splitlines()] == [1]
    half_written = sharded / ".checkpoint-1.pth.tmp"
    half_written.mkdir()
    (half_written / "__0_0.distcp").write_bytes(b"cut")
    result = _run(_cli(sharded, "--epochs", "2", "--auto_resume", "--fsdp", "--sharded_checkpoint"))
    assert "removed 1 half-written file(s)" in result.stdout and not half_written.exists()
    assert [json.loads(line)["epoch"] for line in (sharded / "log.txt").read_text().splitlines()] == [0, 1]
    # under FSDP each process read only its own part of the optimizer state, and the run went on as
    # the DDP run resumed from the whole state did
    assert "optimizer state read shard by shard" in result.stdout
    (model_f, extra_f), (model_d, extra_d) = _run_weights(sharded / "checkpoint-1.pth"), _run_weights(resumed / "checkpoint-1.pth")
    assert extra_f["epoch"] == extra_d["epoch"] == 1
    for key in model_d:
        assert torch.allclose(model_f[key], model_d[key], atol=1e-5, rtol=0), key
    for i, values in extra_d["optimizer"]["state"].items():
        for name, value in values.items():
            assert torch.allclose(extra_f["optimizer"]["state"][i][name].float(), value.float(), atol=1e-5, rtol=0), (i, name)
    # the 2-process folder resumed by one process under FSDP: DCP reshards the optimizer state
    one = _cli(tmp_path / "one_process", "--epochs", "2", "--resume", str(folder), "--fsdp")
    one[one.index("--nproc_per_node") + 1] = "1"
    result = _run(one)
    assert "optimizer state read shard by shard" in result.stdout
    assert [json.loads(line)["epoch"] for line in (tmp_path / "one_process" / "log.txt").read_text().splitlines()] == [1]


def test_a_broken_sharded_checkpoint_is_one_sentence(tmp_path):
    import pickle
    import shutil
    import warnings

    import torch.distributed.checkpoint as dcp

    from common.errors import UserError

    out = tmp_path / "run"
    _run(_cli(out, "--epochs", "1", "--fsdp", "--sharded_checkpoint"))
    folder = out / "checkpoint-0.pth"

    def copy(name):
        target = tmp_path / name / "checkpoint-0.pth"
        shutil.copytree(folder, target)
        return target

    no_shard = copy("no_shard")
    (no_shard / "__1_0.distcp").unlink()
    cut = copy("cut")
    data = (cut / "__0_0.distcp").read_bytes()
    (cut / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    no_metadata = copy("no_metadata")
    (no_metadata / ".metadata").unlink()
    crafted = copy("crafted")  # a pickle that would run a command if unpickled

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    (crafted / ".metadata").write_bytes(pickle.dumps(Payload()))
    crafted_shard = tmp_path / "crafted_shard" / "checkpoint-0.pth"  # DCP's own writer, a payload as a value
    with warnings.catch_warnings():  # DCP notes that it saves in one process, as meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": {"w": torch.zeros(2)}, "optimizer": {"state": {}, "param_groups": [{"params": ["w"],
                  "lr": Payload()}]}}, checkpoint_id=str(crafted_shard), no_dist=True)
    shutil.copy(folder / "run_state.pth", crafted_shard / "run_state.pth")
    cases = {crafted_shard: "never unpickles code", no_shard: "a shard file may be missing or truncated", cut: "a shard file may be missing or truncated",
             no_metadata: "without its .metadata", crafted: "never unpickles code"}
    for path, message in cases.items():
        with pytest.raises(UserError, match=message):
            _run_weights(path)
    assert not (tmp_path / "ran").exists()


class _TwoLayers(torch.nn.Module):
    def __init__(self, more: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
        self.head = torch.nn.Linear(4, 2)
        self.more = torch.nn.Linear(4, 4) if more else None

    def forward(self, x):
        return self.head(self.blocks[0](x))


def _mismatch_worker(rank: int, world: int, folder: str, out_path: str) -> None:
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from common.errors import UserError
    from common.sharded_checkpoint import load_optimizer_shards
    from training.fsdp import shard

    saved = _TwoLayers(more=False)
    shard(saved, saved.blocks)
    optimizer = torch.optim.AdamW(saved.parameters())
    saved(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    dcp.save({"model": get_model_state_dict(saved), "optimizer": get_optimizer_state_dict(saved, optimizer)},
             checkpoint_id=folder)
    other = _TwoLayers(more=True)  # trains a parameter the checkpoint's run did not
    shard(other, other.blocks)
    try:
        load_optimizer_shards(Path(folder), other, torch.optim.AdamW(other.parameters()))
        message = "loaded"
    except UserError as err:
        message = str(err)
    if rank == 0:
        Path(out_path).write_text(message)


def test_an_optimizer_state_of_other_parameters_is_one_sentence_when_read_shard_by_shard(tmp_path):
    run_in_processes(_mismatch_worker, 2, str(tmp_path / "folder"), str(tmp_path / "message"))
    message = (tmp_path / "message").read_text()
    assert "does not match this run's parameters" in message and "more.weight" in message


def test_sharded_checkpoint_needs_fsdp(tmp_path):
    from common.errors import UserError
    from training.cli import pretrain_config_from_argv

    with pytest.raises(UserError, match="--sharded_checkpoint writes the shards of an --fsdp run; add --fsdp"):
        pretrain_config_from_argv(["--data_path", "synthetic", "--sharded_checkpoint", "--output_dir", str(tmp_path)])
