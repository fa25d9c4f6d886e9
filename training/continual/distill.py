"""Feature distillation (LwF-style, no old data): a frozen copy of the previous stage's backbone
encodes the current batch, and λ·(1 − cos) between its features and the new backbone's is added,
for the [CLS] token and for the mean of the tokens, of every modality the batch holds (images,
captions). LwF's rule of distilling on the current data: a text stage is held to what the old
backbone made of the new captions. The new backbone's features cost one more forward per step."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from custom_datasets import batch as B
from training.continual.anchors import previous_backbone
from training.continual.base import ContinualMethod


def _pooled(tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([CLS], mean over the (unpadded) tokens) of `[B, L, D]` features."""
    if mask is None:
        return tokens[:, 0], tokens.mean(1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # [B, L, 1]
    return tokens[:, 0], (tokens * weights).sum(1) / weights.sum(1).clamp_min(1)


def distance(old: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.stack([(1 - F.cosine_similarity(o.float(), n.float(), dim=-1)).mean() for o, n in zip(old, new)]).mean()


class FeatureDistillation(ContinualMethod):
    name = "distill"
    reads = frozenset({"reg_loss_weight"})
    description = "λ·(1 − cos) to a frozen previous backbone's [CLS] and mean features on the current batch (LwF)"
    needs_previous = True
    has_penalty = True

    def start(self, run) -> None:
        self.backbone = run.backbone
        self.teacher = previous_backbone(run)

    def batch_penalty(self, batch: dict[str, Any]) -> torch.Tensor | None:
        terms = []
        if B.IMAGE in batch:
            with torch.no_grad():
                old = _pooled(self.teacher.encode_image(batch[B.IMAGE]))
            terms.append(distance(old, _pooled(self.backbone.encode_image(batch[B.IMAGE]))))
        ids = batch.get(B.INPUT_IDS, batch.get(B.MLM_INPUT_IDS))
        if ids is not None:
            mask = batch.get(B.ATTENTION_MASK)
            with torch.no_grad():
                old = _pooled(self.teacher.encode_text(ids, mask), mask)
            terms.append(distance(old, _pooled(self.backbone.encode_text(ids, mask), mask)))
        return torch.stack(terms).mean() if terms else None
