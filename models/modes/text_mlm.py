"""Masked language modeling over the text path (whole-word masks come from the collate)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from custom_datasets import batch as B
from models.backbone import VLMoBackbone
from models.heads import MLMHead
from models.modes.base import ModeOptions, PretrainMode


def mlm_logits(backbone: VLMoBackbone, head: MLMHead, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits `[M, vocab]`, target ids `[M]`) of the M masked text tokens of the batch."""
    features = backbone.encode_text(batch[B.MLM_INPUT_IDS], batch[B.ATTENTION_MASK])  # [B, L, D]
    labels = batch[B.MLM_LABELS]  # [B, L]
    selected = labels != B.IGNORE_INDEX
    return head(features[selected]).float(), labels[selected]


def mlm_loss(backbone: VLMoBackbone, head: MLMHead, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, accuracy) over the masked text tokens."""
    logits, target = mlm_logits(backbone, head, batch)
    return F.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean()


class TextMLM(PretrainMode):
    name = "text_mlm"
    description = "masked language modeling on captions (LoRA + self-regularization in a continual chain)"
    batch_keys = (B.MLM_INPUT_IDS, B.ATTENTION_MASK, B.MLM_LABELS)
    data_kind = "text"
    paths = frozenset({"text"})
    heads = ("mlm_head",)
    needs_mlm_masks = True

    def __init__(self, backbone: VLMoBackbone, options: ModeOptions | None = None) -> None:
        super().__init__(backbone, options)
        self.mlm_head = MLMHead(backbone.cfg.embed_dim, backbone.cfg.vocab_size, backbone.cfg.layer_norm_eps)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        loss, acc = mlm_loss(self.backbone, self.mlm_head, batch)
        return {"loss": loss, "loss_mlm": loss.detach(), "acc_mlm": acc}
