"""The methods without a penalty of their own: LoRA alone (SeqLoRA), sequential full fine-tuning
(SeqFT), and LoRA with ContinualTransformer's self-regularization (the project's default)."""
from __future__ import annotations

import torch

from models.lora import lora_layers, self_regularization
from training.continual.anchors import changes, previous_state, previously_trained, summed
from training.continual.base import ContinualMethod


class LoraOnly(ContinualMethod):
    name = "lora"
    said_by_lora_flags = True
    description = "LoRA adapters, no regularizer (SeqLoRA; self-regularization at λ = 0)"
    adapters = "required"


class FullFinetune(ContinualMethod):
    name = "full"
    said_by_lora_flags = True
    description = "sequential fine-tuning of the whole backbone, no adapters (SeqFT)"
    adapters = "forbidden"


class SelfRegularization(ContinualMethod):
    """With `--self_reg_scope all` the penalty also covers what a LoRA stage trains without adapters
    (the text embeddings, norms, the final norm) wherever an earlier stage trained it, in the same
    form, λ·Σ||θ_prev ⊙ (θ − θ_prev)||²: ContinualTransformer's penalty leaves those free."""

    name = "self_reg"
    said_by_lora_flags = True
    reads = frozenset({"reg_loss_weight", "reg_delta", "self_reg_scope"})
    description = "LoRA + λ·Σ||W ⊙ ΔW||² (ContinualTransformer's self-regularization)"
    adapters = "required"
    has_penalty = True

    def start(self, run) -> None:
        self.backbone = run.backbone
        self.scaled = run.cfg.lora.reg_delta == "scaled"
        self.everything = run.cfg.continual.self_reg_scope == "all"
        if self.everything:
            self.groups = previously_trained(run)
            self.anchor = previous_state(run)

    def penalty(self) -> torch.Tensor:
        adapted = self_regularization(self.backbone, self.scaled)
        if not self.everything:
            return adapted
        return adapted + fully_trained_penalty(self.backbone, self.anchor, self.groups)


def fully_trained_penalty(backbone, anchor: dict[str, torch.Tensor], groups: set[str] | None) -> torch.Tensor:
    """Σ||θ_prev ⊙ (θ − θ_prev)||² over the weights a stage trains without adapters (those in
    `groups`, the ones an earlier stage trained); adapted linears are self_regularization's."""
    adapted = {f"{name}.weight" for name, _ in lora_layers(backbone)}
    terms = [(anchor[name].to(delta.device, delta.dtype) * delta).pow(2).sum()
             for name, delta in changes(backbone, anchor, groups) if name not in adapted]
    return summed(terms, backbone)
