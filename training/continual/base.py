"""What every continual-learning method is: a small strategy object a stage builds once. It says
whether the stage trains adapters, may add a penalty computed from the weights (once per optimizer
step) or from the batch (every micro-batch), and may change the weights when the stage ends,
before its handover files and report are written. All penalties are weighted by --reg_loss_weight."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from training.config import PretrainConfig


class Stage(Protocol):
    """What a method reads of the stage it runs in (training.pretrain.PretrainRun is one): typed
    here, so that the methods do not depend on the whole run library."""

    cfg: "PretrainConfig"
    ctx: Any  # training.scaffold.RunContext: device, ranks, output folder
    mode: Any  # the pretraining mode: objective, heads, backbone
    weights: Any  # training.weights.Weights: what --init_from held
    carried: Any  # training.weights.CarriedHeads: earlier stages' heads
    grid: tuple[int, int]
    text_tokenizer: Any

    @property
    def backbone(self) -> torch.nn.Module: ...

    def starting_backbone(self) -> torch.nn.Module: ...

    def stage_config(self, folder: Path) -> "PretrainConfig": ...

    def mode_options(self, visual_tokenizer) -> Any: ...


class ContinualMethod:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line for --help and the docs
    adapters: ClassVar[str] = "any"  # "required", "forbidden" or "any" (LoRA or the full backbone)
    needs_previous: ClassVar[bool] = False  # needs the previous stage's weights (--init_from)
    has_penalty: ClassVar[bool] = False
    reads: ClassVar[frozenset[str]] = frozenset()  # the flags of this method alone (a flag no method of the run reads is refused)
    replays: ClassVar[bool] = False  # draws earlier stages' data each step (no exact mid-epoch resume yet)
    said_by_lora_flags: ClassVar[bool] = False  # the run's first line already says it (LoRA rank, self-reg weight)

    def __init__(self, cfg: "PretrainConfig") -> None:
        self.cfg = cfg

    def start(self, run: Stage) -> None:
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

    def finish(self, run: Stage) -> None:
        """After the last epoch, before the handover files and the stage report."""

    def knobs(self) -> dict[str, float]:
        """This method's own settings, by flag name, as checkpoints record them (λ aside: every
        penalty's, recorded with the LoRA settings)."""
        return {}

    def note(self) -> str:
        """The method in words, for the run's first line."""
        if self.said_by_lora_flags:
            return ""
        words = [self.description] + ([f"λ {self.cfg.lora.reg_loss_weight:g}"] if self.has_penalty else [])
        words += [f"--{flag} {value:g}" for flag, value in self.knobs().items()]
        return f"; continual method {self.name} ({', '.join(words)})"
