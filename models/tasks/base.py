"""What every pretraining mode shares: a backbone, its own heads, declared batch keys, and a
forward that returns `loss` plus named `loss_*` / `acc_*` scalars."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from models.backbone import VLMoBackbone


class PretrainTask(nn.Module):
    """Base class of a mode. Subclasses set `name` and `batch_keys` and implement `forward`."""

    name: ClassVar[str] = ""
    batch_keys: ClassVar[tuple[str, ...]] = ()
    needs_visual_tokens: ClassVar[bool] = False

    def __init__(self, backbone: VLMoBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def check_batch(self, batch: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self.batch_keys if k not in batch]
        if missing:
            raise KeyError(f"{self.name} needs batch keys {missing}; got {sorted(batch)}")

    def frozen_parameter_names(self) -> list[str]:
        """Parameters this mode never uses (frozen when the run is built)."""
        return []

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
