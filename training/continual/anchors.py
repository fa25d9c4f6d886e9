"""The previous stage's weights θ_prev that l2, ewc, distill and wise measure a stage against, and
the change θ − θ_prev of everything the stage trains (for an adapted linear: ΔW = scaling·B·A; its
base weight is θ_prev and stays frozen). Names are the backbone's plain parameter names
(`blocks.0.attn.qkv.weight`), as in merged checkpoints without the `backbone.` prefix."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from common.console import say
from common.errors import UserError
from common.sharded_tensors import full_tensor, is_dtensor, local_part, rows_like, summed_over_shards
from models.lora import delta_weight, is_adapter_key, load_plain_state, lora_layers, plain_names
from models.pretrained import UNTRAINED, weight_groups

if TYPE_CHECKING:
    from training.continual.base import Stage


def previous_backbone(run: "Stage") -> nn.Module:
    """A frozen copy of the backbone as the stage received it, whole on every process. A resumed
    run rebuilds it from --init_from (its own weights have moved since); a sharded one gathers its
    shards into a backbone built the same way (every process takes part)."""
    if run.weights.continue_run:
        start = run.cfg.model.init_from
        if not start:
            raise UserError(f"--cl_method {run.cfg.continual.cl_method} measures the stage against the weights it "
                            f"started from; when resuming, pass the same --init_from as the run's first start")
        say(f"--cl_method {run.cfg.continual.cl_method}: the previous stage's weights are read again from {start}")
        frozen = run.starting_backbone()
    elif is_sharded_backbone(run.backbone):
        frozen = run.starting_backbone()
        load_plain_state(frozen, {k: full_tensor(v).detach() for k, v in plain_names(run.backbone.state_dict()).items()
                                  if not is_adapter_key(k)})
    else:
        frozen = copy.deepcopy(run.backbone)  # adapters (if any) still have B = 0: outputs are θ_prev's
    frozen.requires_grad_(False)
    return frozen.eval().to(run.ctx.device)


def base_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Plain names -> detached base weights (adapters left out); of a sharded backbone, this
    process's rows."""
    return {k: local_part(v).detach().clone() for k, v in plain_names(backbone.state_dict()).items()
            if not is_adapter_key(k)}


def own_weights(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Plain names -> the backbone's parameters (DTensors when sharded), base weights included."""
    return plain_names(dict(backbone.named_parameters()))


def previous_state(run: "Stage") -> dict[str, torch.Tensor]:
    """θ_prev as plain-named tensors (a fresh stage's base weights as built; a resumed one's
    re-read), under FSDP the rows this process holds."""
    if not run.weights.continue_run:
        return base_state(run.backbone)
    own = own_weights(run.backbone)
    return {k: rows_like(v, own[k]) if k in own else v for k, v in base_state(previous_backbone(run)).items()}


def previously_trained(run: "Stage") -> set[str] | None:
    """Weight groups (`backbone.blocks`, ...) some earlier stage trained; None when unknown (every
    group counts then). Weights no stage trained yet (a random text embedding) have no previous
    knowledge to keep."""
    ckpt = run.weights.ckpt
    if ckpt is None or run.weights.continue_run:
        return None
    names = [f"backbone.{k}" for k in plain_names(run.backbone.state_dict()) if not is_adapter_key(k)]
    return weight_groups(names) - set(ckpt.info.get(UNTRAINED, []))


def changes(backbone: nn.Module, anchor: dict[str, torch.Tensor],
            groups: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(plain name, θ − θ_prev) of every backbone weight that trains (through adapters or directly),
    limited to `groups` when given; under FSDP of this process's rows (`anchor` holds the same)."""
    adapted = set()
    for name, layer in lora_layers(backbone):
        key = f"{name}.weight"
        adapted.add(key)
        if any(p.requires_grad for p in layer.parameters() if p is not layer.base_layer.weight) and _in(key, groups):
            yield key, delta_weight(layer)
    for name, param in own_weights(backbone).items():
        if is_adapter_key(name) or name in adapted or not param.requires_grad or not _in(name, groups):
            continue
        rows = local_part(param)
        if name in anchor and anchor[name].shape == rows.shape:
            yield name, rows - anchor[name].to(rows.device, rows.dtype)


def summed(terms: list[torch.Tensor], backbone: nn.Module) -> torch.Tensor:
    """The sum of a penalty's terms (under FSDP: this process's rows, summed over the processes);
    zero on the backbone's device when nothing trains."""
    total = torch.stack(terms).sum() if terms else local_part(next(backbone.parameters())).new_zeros(())
    return summed_over_shards(total, is_sharded_backbone(backbone))


def is_sharded_backbone(backbone: nn.Module) -> bool:
    return any(is_dtensor(p) for p in backbone.parameters())


def _in(name: str, groups: set[str] | None) -> bool:
    return groups is None or weight_groups([f"backbone.{name}"]) <= groups
