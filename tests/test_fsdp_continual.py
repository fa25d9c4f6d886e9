"""Every continual-learning method that regularizes, under FSDP (2 gloo processes, each block's
weights split by rows): after 3 steps the weights equal one process's on the combined batch (1e-5).
self_reg, l2 and ewc sum their penalty over each process's rows and the processes; distill runs a
whole frozen teacher gathered from the shards; wise interpolates each process's rows; replay
adds the earlier objective's batches through the sharded backbone."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from common.checkpoint_io import save_safetensors
from common.sharded_tensors import rows_like
from models.lora import add_lora, is_adapter_key, plain_names
from tests.distributed_harness import run_in_processes
from tests.test_distributed_pretrain import BATCH, SETTINGS, STEPS, _batches, _task
from training.continual import CL_METHODS
from training.continual.fisher import FISHER_FILE

CASES = {"self_reg": True, "self_reg all": True, "l2": False, "ewc": True, "distill": False, "wise": True}  # trains LoRA


def _method_task(lora: bool):
    task = _task()
    if lora:  # adapters and the MIM head train, the base weights stay
        add_lora(task.backbone, 4, 8)
        for name, param in task.named_parameters():
            param.requires_grad_(not name.startswith("backbone.") or is_adapter_key(plain_names({name: param}).popitem()[0]))
    return task


def _run(task, init_from: str, scope: str = "adapters") -> SimpleNamespace:
    return SimpleNamespace(backbone=task.backbone, weights=SimpleNamespace(continue_run=False, ckpt=None),
                           ctx=SimpleNamespace(device=torch.device("cpu")), starting_backbone=lambda: _task().backbone,
                           cfg=SimpleNamespace(model=SimpleNamespace(init_from=init_from),
                                               continual=SimpleNamespace(cl_method="test", wise_alpha=0.5, self_reg_scope=scope),
                                               lora=SimpleNamespace(lora_rank=4, reg_delta="scaled")))


def _train_with(model, task, batches, method_name: str, folder: str) -> dict[str, float]:
    import dataclasses

    from engine_pretrain import train_one_epoch

    name, _, scope = method_name.partition(" ")  # "self_reg all": the penalty on every trained weight
    method = CL_METHODS[name](None)
    run = _run(task, f"{folder}/checkpoint.pth", scope or "adapters")
    method.start(run)
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=SETTINGS.lr, weight_decay=0.05)
    settings = dataclasses.replace(SETTINGS, reg_loss_weight=10.0 if name != "self_reg" else 1e4)
    stats = train_one_epoch(model, batches, optimizer, torch.device("cpu"), 0, settings, lambda b: b,
                            steps_per_epoch=STEPS, regularizer=method.penalty if method.has_penalty else None,
                            batch_regularizer=method.batch_penalty if method.has_penalty else None)
    method.finish(run)
    return stats


def _fsdp_worker(rank: int, world: int, out_path: str, method_name: str, folder: str) -> None:
    from training.fsdp import gathered_state, shard

    task = _method_task(CASES[method_name])
    shard(task, task.backbone.blocks)
    per_rank = BATCH // world
    stats = _train_with(task, task, [{k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in b.items()}
                                     for b in _batches()], method_name, folder)
    state, _ = gathered_state(task)
    if rank == 0:
        torch.save({"state": state, "stats": stats}, out_path)


def _fisher_beside(folder) -> None:
    """A Fisher sidecar with a different positive value for every base weight entry."""
    gen = torch.Generator().manual_seed(3)
    base = plain_names(_task().backbone.state_dict())
    save_safetensors(folder / FISHER_FILE, {k: torch.rand(v.shape, generator=gen) * 100 for k, v in base.items()})


@pytest.mark.parametrize("method_name", [pytest.param(m, marks=pytest.mark.slow) if m in ("l2", "distill", "wise", "self_reg all") else m
                                         for m in CASES])  # by default the two that sum shards of merged ΔW
def test_a_regularized_stage_under_fsdp_matches_one_process(tmp_path, method_name):
    _fisher_beside(tmp_path)
    run_in_processes(_fsdp_worker, 2, str(tmp_path / "fsdp.pt"), method_name, str(tmp_path))
    task = _method_task(CASES[method_name])
    initial = {k: v.clone() for k, v in task.state_dict().items()}
    stats = _train_with(task, task, _batches(), method_name, str(tmp_path))
    saved = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    sharded = saved["state"]
    if "loss_reg" in stats:  # the logged penalty is the whole model's, not one process's rows'
        assert saved["stats"]["loss_reg"] == pytest.approx(stats["loss_reg"], rel=1e-4) and stats["loss_reg"] > 0
    assert sharded.keys() == task.state_dict().keys()
    for key, value in task.state_dict().items():
        assert torch.allclose(sharded[key], value, atol=1e-5, rtol=0), key
    assert sum(not torch.equal(v, initial[k]) for k, v in task.state_dict().items()) > 10
    plain = _method_task(CASES[method_name])
    _train_with(plain, plain, _batches(), "lora" if CASES[method_name] else "full", str(tmp_path))
    assert any((v - plain.state_dict()[k]).abs().max() > 1e-6 for k, v in task.state_dict().items())  # it acted


def _rows_worker(rank: int, world: int, out_path: str) -> None:
    from training.fsdp import shard

    task = _task()
    whole = {k: v.clone() for k, v in task.backbone.state_dict().items()}
    shard(task, task.backbone.blocks)
    rows = {k: rows_like(whole[k], v).clone() for k, v in task.backbone.state_dict().items()}
    local = {k: v.to_local().clone() for k, v in task.backbone.state_dict().items()}
    torch.save({"rows": rows, "local": local}, f"{out_path}.{rank}")


def test_rows_like_takes_the_rows_each_process_holds(tmp_path):
    """Every weight's rows as rows_like cuts them from the whole tensor are the process's own shard
    (also where there are fewer rows than processes: the cls token's one row)."""
    run_in_processes(_rows_worker, 2, str(tmp_path / "rows.pt"))
    for rank in range(2):
        saved = torch.load(f"{tmp_path / 'rows.pt'}.{rank}", weights_only=True)
        for key, value in saved["local"].items():
            assert torch.equal(saved["rows"][key], value), (rank, key)


@pytest.mark.slow  # two torchrun runs, ~30 s
def test_torchrun_fsdp_replay_stage_writes_the_weights_ddp_writes(tmp_path):
    """The CLI end to end: a text stage replaying the image stage's MIM batches (a second objective
    through the sharded backbone, with its frozen carried head), under --fsdp and under DDP, from
    the same image stage: the checkpoints agree to 1e-6."""
    from custom_datasets.pair_data import caption_texts
    from models.checkpoints import read_model_checkpoint
    from models.text_tokenizer import train_wordpiece
    from tests.test_fsdp import _cli, _run

    train_wordpiece(caption_texts(["synthetic"], 500, 0), 200, tmp_path / "tok")
    image = _cli(tmp_path / "image", "--epochs", "1", "--tokenizer", str(tmp_path / "tok"))
    script = next(i for i, arg in enumerate(image) if arg.endswith("main_pretrain_cook.py"))
    _run([image[0], *image[script:]])  # the image stage in one process
    start = str(tmp_path / "image" / "checkpoint-0.pth")
    weights = {}
    for name, flags in (("fsdp", ["--fsdp"]), ("ddp", [])):
        out = tmp_path / name
        result = _run(_cli(out, "--exp_name", "text_mlm", "--epochs", "1", "--tokenizer", str(tmp_path / "tok"),
                           "--lora_rank", "4", "--cl_method", "replay", "--init_from", start, *flags))
        assert "replay" in result.stdout
        weights[name] = read_model_checkpoint(str(out / "checkpoint-0.pth")).model
    assert weights["fsdp"].keys() == weights["ddp"].keys()
    for key, value in weights["ddp"].items():
        assert torch.allclose(weights["fsdp"][key].float(), value.float(), atol=1e-6, rtol=0), key


class _Loader(list):
    @property
    def batch_size(self) -> int:
        return len(self[0]["image"])


def _fisher_of(task, batches, world: int) -> dict[str, torch.Tensor]:
    from training.continual.fisher import estimate_fisher

    run = SimpleNamespace(mode=task, backbone=task.backbone, ctx=SimpleNamespace(world=world, device=torch.device("cpu")))
    fisher, used = estimate_fisher(run, SimpleNamespace(train_loader=_Loader(batches), prepare=lambda b: b),
                                   BATCH * STEPS)
    assert used == STEPS
    return fisher


def _fisher_worker(rank: int, world: int, out_path: str) -> None:
    from training.fsdp import shard

    task = _task()
    shard(task, task.backbone.blocks)
    per_rank = BATCH // world
    fisher = _fisher_of(task, [{k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in b.items()} for b in _batches()],
                        world)
    if rank == 0:
        torch.save(fisher, out_path)


def test_fsdp_fisher_is_the_one_process_estimate_on_the_global_batch(tmp_path):
    """Under FSDP the squared gradient is the global batch's (FSDP never holds a process's own): two
    processes give one process's Fisher on the combined batches, for every weight that trains."""
    run_in_processes(_fisher_worker, 2, str(tmp_path / "fisher.pt"))
    sharded = torch.load(tmp_path / "fisher.pt", weights_only=True)
    task = _task()
    whole = _fisher_of(task, _batches(), 1)
    trained = {k for k, p in plain_names(dict(task.backbone.named_parameters())).items() if p.requires_grad}
    assert set(sharded) == trained and len(trained) > 20
    for key, value in sharded.items():
        assert torch.allclose(value, whole[key], rtol=1e-4, atol=1e-12), key
    assert sum(whole[k].sum() for k in trained) > 0
    assert all(whole[k].sum() == 0 for k in set(whole) - trained)  # the frozen text path: no gradient either way
