"""Fully sharded data parallel (torch's FSDP2, `fully_shard`): each block and then the whole model
is sharded across the processes, so parameters, gradients and optimizer state take 1/world of the
memory each, for backbones that do not fit one device. Checkpoints are gathered into one ordinary
file on rank 0 (model and optimizer state in the same layout as a DDP or single-process run
writes), or with `--sharded_checkpoint` written as each process's shards
(training/sharded_checkpoint.py); either loads into one process for fine-tuning and export, and
resumes under FSDP, DDP or one process alike."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from common.distributed import broadcast_from_main, mean_over_ranks
from common.errors import UserError
from common.sharded_checkpoint import position_keyed

def shard(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Every block its own unit (its parameters are gathered just for its forward and backward),
    the rest (embeddings, heads) the root unit. Every rank first takes rank 0's weights, as DDP
    does: ranks seed differently, and each would otherwise keep its shard of its own random init."""
    from torch.distributed.fsdp import fully_shard

    broadcast_from_main([*model.parameters(), *model.buffers()])
    # fully_shard refuses 0-d parameters (ITC's logit scale): they stay whole on every rank, and
    # their gradients are averaged over the ranks as DDP averages every gradient
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for block in blocks:
        fully_shard(block, ignored_params=scalars)
    fully_shard(model, ignored_params=scalars)
    for param in scalars:
        if param.requires_grad:
            param.register_hook(mean_over_ranks)

def share_main_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) into every rank, before the model is
    evaluated: each rank's statistics follow its own batches (on CPU, where there is no
    SyncBatchNorm; FSDP never broadcasts them, DDP only into the wrapped forward), so without this
    each rank would evaluate its part of the held-out set with different statistics, and none
    with those the checkpoint (rank 0's) holds. Every rank must call it."""
    broadcast_from_main(list(model.buffers()))

def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)

def parameter_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own order: the ids `optimizer.state_dict()`
    uses are positions in this list."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]

def gathered_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict]:
    """(model state, optimizer state) as full CPU tensors on rank 0 (empty elsewhere); every rank
    must call it. The optimizer state is keyed by position, as `optimizer.state_dict()` is."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if optimizer is None:
        return model_state, {}
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    return model_state, position_keyed(by_name) if by_name else {}

def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """A position-keyed optimizer state (any run's checkpoint) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = parameter_order(model, optimizer)
    if len(saved["state"]) > len(names) or any(len(g["params"]) != len(o["params"])
                                               for g, o in zip(saved["param_groups"], optimizer.param_groups)):
        raise UserError("the checkpoint's optimizer state does not match this run's parameters; resume with the same "
                        "--exp_name, LoRA and model flags")
    by_name = {"state": {names[int(i)]: value for i, value in saved["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

@contextlib.contextmanager
def unsharded_root(model: nn.Module) -> Iterator[None]:
    """The root unit's parameters (embeddings, heads) gathered while code other than the model's
    forward uses them (stage reports call the backbone and heads directly); blocks gather their own
    in their forward. Every rank must enter it and make the same calls inside."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
