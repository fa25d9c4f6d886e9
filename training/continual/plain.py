"""The methods without a penalty of their own: LoRA alone (SeqLoRA), sequential full fine-tuning
(SeqFT), and LoRA with ContinualTransformer's self-regularization (the project's default)."""
from __future__ import annotations

import torch

from models.lora import self_regularization
from training.continual.base import ContinualMethod


class LoraOnly(ContinualMethod):
    name = "lora"
    description = "LoRA adapters, no regularizer (SeqLoRA; self-regularization at λ = 0)"
    adapters = "required"


class FullFinetune(ContinualMethod):
    name = "full"
    description = "sequential fine-tuning of the whole backbone, no adapters (SeqFT)"
    adapters = "forbidden"


class SelfRegularization(ContinualMethod):
    name = "self_reg"
    reads = frozenset({"reg_loss_weight", "reg_delta"})
    description = "LoRA + λ·Σ||W ⊙ ΔW||² (ContinualTransformer's self-regularization)"
    adapters = "required"
    has_penalty = True

    def start(self, run) -> None:
        self.backbone = run.backbone
        self.scaled = run.cfg.lora.reg_delta == "scaled"

    def penalty(self) -> torch.Tensor:
        return self_regularization(self.backbone, self.scaled)
