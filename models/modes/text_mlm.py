"""Masked language modeling over the text path (whole-word masks come from the collate)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from custom_datasets import batch as B
from models.backbone import VLMoBackbone
from models.heads import MLMHead
from models.modes.base import ModeOptions, PretrainMode


def masked_token_logits(head: MLMHead, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits `[M, vocab]`, target ids `[M]`) of the M positions of `[B, L, D]` text features that
    `[B, L]` labels mark as masked."""
    selected = labels != B.IGNORE_INDEX
    return head(features[selected]).float(), labels[selected]


def mlm_logits(backbone: VLMoBackbone, head: MLMHead, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits `[M, vocab]`, target ids `[M]`) of the M masked text tokens of the batch."""
    features = backbone.encode_text(batch[B.MLM_INPUT_IDS], batch[B.ATTENTION_MASK])  # [B, L, D]
    return masked_token_logits(head, features, batch[B.MLM_LABELS])


def loss_and_accuracy(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean()


def mlm_loss(backbone: VLMoBackbone, head: MLMHead, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, accuracy) over the masked text tokens."""
    return loss_and_accuracy(*mlm_logits(backbone, head, batch))


class TextMLM(PretrainMode):
    name = "text_mlm"
    description = "masked language modeling on captions (LoRA + self-regularization in a continual chain)"
    batch_keys = (B.MLM_INPUT_IDS, B.ATTENTION_MASK, B.MLM_LABELS)
    data_kind = "text"
    paths = frozenset({"text"})
    heads = ("mlm_head",)
    needs_mlm_masks = True
    reads = frozenset({"text", "mlm"})

    def __init__(self, backbone: VLMoBackbone, options: ModeOptions | None = None) -> None:
        super().__init__(backbone, options)
        self.mlm_head = MLMHead(backbone.cfg.embed_dim, backbone.cfg.vocab_size, backbone.cfg.layer_norm_eps)

    def masked_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """What the masked words are predicted from: the text path alone."""
        return mlm_logits(self.backbone, self.mlm_head, batch)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        loss, acc = loss_and_accuracy(*self.masked_logits(batch))
        return {"loss": loss, "loss_mlm": loss.detach(), "acc_mlm": acc}
