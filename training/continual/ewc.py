"""Elastic weight consolidation: λ·Σ F·(θ − θ_prev)², with F the previous stage's diagonal Fisher
information (its sidecar, written by that stage with --fisher_samples). With adapters θ − θ_prev
is the merged ΔW of each adapted linear."""
from __future__ import annotations

import torch

from common.console import say
from common.sharded_tensors import rows_like
from training.continual.anchors import changes, own_weights, previous_state, summed
from training.continual.base import ContinualMethod
from training.continual.fisher import fisher_beside, load_fisher


class ElasticWeightConsolidation(ContinualMethod):
    name = "ewc"
    reads = frozenset({"reg_loss_weight"})
    description = "λ·Σ F·(θ − θ_prev)², F the previous stage's Fisher (its --fisher_samples sidecar)"
    needs_previous = True
    has_penalty = True

    def start(self, run) -> None:
        self.backbone = run.backbone
        fisher = load_fisher(run.cfg.model.init_from)
        self.anchor = previous_state(run)
        trained, own = dict(changes(self.backbone, self.anchor)), own_weights(self.backbone)
        rows = {k: rows_like(f, own[k]) for k, f in fisher.items() if k in trained and f.shape == own[k].shape}
        self.fisher = {k: f.to(run.ctx.device) for k, f in rows.items()}  # under FSDP: this process's rows
        uncovered = sorted(set(trained) - set(self.fisher))
        say(f"ewc: Fisher information of {fisher_beside(run.cfg.model.init_from)} on {len(self.fisher)} of the "
            f"{len(trained)} trained weights" + (f" (none for {', '.join(uncovered[:4])}"
                                                 f"{' ...' if len(uncovered) > 4 else ''}: not penalised)"
                                                 if uncovered else ""))

    def penalty(self) -> torch.Tensor:
        terms = [(self.fisher[k] * delta.pow(2)).sum() for k, delta in changes(self.backbone, self.anchor)
                 if k in self.fisher]
        return summed(terms, self.backbone)
