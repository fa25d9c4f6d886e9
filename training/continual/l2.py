"""L2-SP: λ·Σ||θ − θ_prev||² over every backbone weight the stage trains that an earlier stage
trained (through adapters: Σ||ΔW||², the unweighted form of self-regularization's Σ||W ⊙ ΔW||²)."""
from __future__ import annotations

import torch

from training.continual.anchors import changes, previous_state, previously_trained, summed
from training.continual.base import ContinualMethod


class L2ToPrevious(ContinualMethod):
    name = "l2"
    reads = frozenset({"reg_loss_weight"})
    description = "λ·Σ||θ − θ_prev||² to the previous stage's weights (L2-SP)"
    needs_previous = True
    has_penalty = True

    def start(self, run) -> None:
        self.backbone = run.backbone
        self.groups = previously_trained(run)
        self.anchor = previous_state(run)

    def penalty(self) -> torch.Tensor:
        terms = [delta.pow(2).sum() for _, delta in changes(self.backbone, self.anchor, self.groups)]
        return summed(terms, self.backbone)
