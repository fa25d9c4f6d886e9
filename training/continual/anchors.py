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
from models.lora import delta_weight, is_adapter_key, lora_layers, plain_names
from models.pretrained import UNTRAINED, weight_groups

if TYPE_CHECKING:
    from training.pretrain import PretrainRun


def previous_backbone(run: "PretrainRun") -> nn.Module:
    """A frozen copy of the backbone as the stage received it. A resumed run rebuilds it from
    --init_from (its own weights have moved since)."""
    if run.weights.continue_run:
        start = run.cfg.model.init_from
        if not start:
            raise UserError(f"--cl_method {run.cfg.continual.cl_method} measures the stage against the weights it "
                            f"started from; when resuming, pass the same --init_from as the run's first start")
        say(f"--cl_method {run.cfg.continual.cl_method}: the previous stage's weights are read again from {start}")
        frozen = run.starting_backbone()
    else:
        frozen = copy.deepcopy(run.backbone)  # adapters (if any) still have B = 0: outputs are θ_prev's
    frozen.requires_grad_(False)
    return frozen.eval().to(run.ctx.device)


def base_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Plain names -> detached base weights (adapters left out)."""
    return {k: v.detach().clone() for k, v in plain_names(backbone.state_dict()).items() if not is_adapter_key(k)}


def previous_state(run: "PretrainRun") -> dict[str, torch.Tensor]:
    """θ_prev as plain-named tensors (a fresh stage's base weights as built; a resumed one's re-read)."""
    return base_state(previous_backbone(run) if run.weights.continue_run else run.backbone)


def previously_trained(run: "PretrainRun") -> set[str] | None:
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
    limited to `groups` when given."""
    adapted = set()
    for name, layer in lora_layers(backbone):
        key = f"{name}.weight"
        adapted.add(key)
        if any(p.requires_grad for p in layer.parameters() if p is not layer.base_layer.weight) and _in(key, groups):
            yield key, delta_weight(layer)
    for name, param in plain_names(dict(backbone.named_parameters())).items():
        if is_adapter_key(name) or name in adapted or not param.requires_grad or not _in(name, groups):
            continue
        if name in anchor and anchor[name].shape == param.shape:
            yield name, param - anchor[name].to(param.device, param.dtype)


def summed(terms: list[torch.Tensor], backbone: nn.Module) -> torch.Tensor:
    """The sum of a penalty's terms; zero on the backbone's device when nothing trains."""
    return torch.stack(terms).sum() if terms else next(backbone.parameters()).new_zeros(())


def _in(name: str, groups: set[str] | None) -> bool:
    return groups is None or weight_groups([f"backbone.{name}"]) <= groups
