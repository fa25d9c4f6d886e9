"""BEiT masked image modeling: predict the visual token of every masked patch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from custom_datasets import batch as B
from models.backbone import VLMoBackbone
from models.heads import MIMHead
from models.modes.base import ModeOptions, PretrainMode


def mim_logits(backbone: VLMoBackbone, head: MIMHead, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits `[M, V]`, target ids `[M]`) of the M masked patches of the batch."""
    mask = batch[B.MASKED_PATCHES].flatten(1).bool()  # [B, N]
    features = backbone.encode_image(batch[B.IMAGE], mask)[:, 1:]  # [B, N, D]
    return head(features[mask]).float(), batch[B.VISUAL_TOKENS][mask]


def mim_loss(backbone: VLMoBackbone, head: MIMHead, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, accuracy) over the masked patches."""
    logits, labels = mim_logits(backbone, head, batch)
    return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()


class ImageMIM(PretrainMode):
    name = "image_mim"
    description = "BEiT masked image modeling on visual tokens (full training; the first stage)"
    batch_keys = (B.IMAGE, B.MASKED_PATCHES, B.VISUAL_TOKENS)
    data_kind = "image"
    paths = frozenset({"image", "masked_image"})
    heads = ("mim_head",)
    needs_visual_tokens = True

    def __init__(self, backbone: VLMoBackbone, options: ModeOptions) -> None:
        super().__init__(backbone, options)
        if not options.visual_vocab_size:
            raise ValueError("image_mim needs ModeOptions.visual_vocab_size")
        self.mim_head = MIMHead(backbone.cfg.embed_dim, options.visual_vocab_size)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        loss, acc = mim_loss(self.backbone, self.mim_head, batch)
        return {"loss": loss, "loss_mim": loss.detach(), "acc_mim": acc}
