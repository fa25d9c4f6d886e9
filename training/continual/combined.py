"""Self-regularization and replay together: the adapters are held close to the weights that
matter (λ·Σ||W ⊙ ΔW||², --self_reg_scope as for self_reg) while a share --replay_ratio of each step
replays the earlier stages' data and objectives, which the penalty alone cannot protect (what an
earlier stage's head and data demand, not only where its weights are large)."""
from __future__ import annotations

from typing import Any

import torch

from training.continual.base import ContinualMethod
from training.continual.plain import SelfRegularization
from training.continual.replay import ExperienceReplay


class SelfRegularizedReplay(ContinualMethod):
    name = "self_reg+replay"
    reads = SelfRegularization.reads | ExperienceReplay.reads
    description = "self-regularization's penalty (weight λ) with replay's samples (weight 1, as the stage's own)"
    adapters = "required"
    needs_previous = True
    has_penalty = True
    replays = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.regularizer, self.replay = SelfRegularization(cfg), ExperienceReplay(cfg)

    def start(self, run) -> None:
        self.regularizer.start(run)
        self.replay.start(run)

    def penalty(self) -> torch.Tensor:
        return self.regularizer.penalty()

    def batch_penalty(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.replay.batch_penalty(batch)

    def batch_penalty_weight(self) -> float:
        return 1.0  # replayed samples count as the stage's own; λ is the penalty's
