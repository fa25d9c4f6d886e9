"""WiSE: when the stage ends, its weights move back towards the previous stage's,
θ = (1 − α)·θ_prev + α·θ_new (--wise_alpha). With adapters this scales each ΔW by α (B ← α·B);
weights trained directly are interpolated; the heads stay as trained. The handover files and the
stage report are of the interpolated model; the epoch checkpoints keep the trained one."""
from __future__ import annotations

import torch

from common.console import say
from common.sharded_tensors import local_part
from models.lora import ADAPTER, is_adapter_key, lora_layers, plain_names
from training.continual.anchors import previous_state
from training.continual.base import ContinualMethod


class WeightInterpolation(ContinualMethod):
    name = "wise"
    reads = frozenset({"wise_alpha"})
    description = "after the stage, θ = (1 − α)·θ_prev + α·θ_new (--wise_alpha)"
    needs_previous = True

    def knobs(self) -> dict[str, float]:
        return {"wise_alpha": self.cfg.continual.wise_alpha}

    def start(self, run) -> None:
        self.alpha = run.cfg.continual.wise_alpha
        self.anchor = previous_state(run)

    @torch.no_grad()
    def finish(self, run) -> None:
        interpolate(run.backbone, self.anchor, self.alpha)
        say(f"wise: weights set to {1 - self.alpha:g}·previous + {self.alpha:g}·trained")


@torch.no_grad()
def interpolate(backbone: torch.nn.Module, anchor: dict[str, torch.Tensor], alpha: float) -> None:
    adapted = set()
    for name, layer in lora_layers(backbone):
        adapted.add(f"{name}.weight")
        layer.lora_B[ADAPTER].weight.mul_(alpha)
    for name, param in plain_names(dict(backbone.named_parameters())).items():
        rows = local_part(param)  # under FSDP this process's rows, as the anchor holds
        if name in adapted or name not in anchor or is_adapter_key(name) or anchor[name].shape != rows.shape:
            continue
        rows.copy_(torch.lerp(anchor[name].to(rows.device, rows.dtype), rows, alpha))  # exact at α = 0 and 1
