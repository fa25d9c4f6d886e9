"""BEiT masked image modeling: predict the visual token of every masked patch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.backbone import VLMoBackbone
from models.heads import MIMHead
from models.tasks.base import PretrainTask, TaskOptions


def mim_logits(backbone: VLMoBackbone, head: MIMHead, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits `[M, V]`, target ids `[M]`) of the M masked patches of the batch."""
    mask = batch["bool_masked_pos"].flatten(1).bool()  # [B, N]
    features = backbone.encode_image(batch["image"], mask)[:, 1:]  # [B, N, D]
    return head(features[mask]).float(), batch["visual_token_ids"][mask]


def mim_loss(backbone: VLMoBackbone, head: MIMHead, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, accuracy) over the masked patches."""
    logits, labels = mim_logits(backbone, head, batch)
    return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()


class ImageMIM(PretrainTask):
    name = "image_mim"
    batch_keys = ("image", "bool_masked_pos", "visual_token_ids")
    data_kind = "image"
    paths = frozenset({"image", "masked_image"})
    heads = ("mim_head",)
    needs_visual_tokens = True

    def __init__(self, backbone: VLMoBackbone, options: TaskOptions) -> None:
        super().__init__(backbone, options)
        if not options.visual_vocab_size:
            raise ValueError("image_mim needs TaskOptions.visual_vocab_size")
        self.mim_head = MIMHead(backbone.cfg.embed_dim, options.visual_vocab_size)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        loss, acc = mim_loss(self.backbone, self.mim_head, batch)
        return {"loss": loss, "loss_mim": loss.detach(), "acc_mim": acc}
