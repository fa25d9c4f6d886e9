"""What every continual-learning method is: a small strategy object a stage builds once. It says
whether the stage trains adapters, may add a penalty computed from the weights (once per optimizer
step) or from the batch (every micro-batch), and may change the weights when the stage ends,
before its handover files and report are written. All penalties are weighted by --reg_loss_weight."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from training.config import PretrainConfig
    from training.pretrain import PretrainRun


class ContinualMethod:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line for --help and the docs
    adapters: ClassVar[str] = "any"  # "required", "forbidden" or "any" (LoRA or the full backbone)
    needs_previous: ClassVar[bool] = False  # needs the previous stage's weights (--init_from)
    has_penalty: ClassVar[bool] = False
    reads: ClassVar[frozenset[str]] = frozenset()  # the flags of this method alone (a flag no method of the run reads is refused)
    replays: ClassVar[bool] = False  # draws earlier stages' data each step (no exact mid-epoch resume yet)

    def __init__(self, cfg: "PretrainConfig") -> None:
        self.cfg = cfg

    def start(self, run: "PretrainRun") -> None:
        """After the stage is built (weights loaded, adapters added), before the first step."""

    def penalty(self) -> torch.Tensor | None:
        """A loss term computed from the weights alone (None: none)."""
        return None

    def batch_penalty(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """A loss term computed on the prepared batch (None: none)."""
        return None

    def batch_penalty_weight(self) -> float:
        """What `batch_penalty` is multiplied by in the loss: --reg_loss_weight, as `penalty` is."""
        return self.cfg.lora.reg_loss_weight

    def finish(self, run: "PretrainRun") -> None:
        """After the last epoch, before the handover files and the stage report."""
