"""Image-text contrastive learning (VLMo ITC): symmetric InfoNCE between the image and text [CLS]
projections with a learnable temperature; negatives come from every rank."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from custom_datasets import batch as B
from models.backbone import VLMoBackbone
from models.heads import ITCHead
from models.modes.base import ModeOptions, PretrainMode


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor,
                     gather: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Loss over the batch gathered from all ranks (each rank computes the same global loss; the
    gather's backward sums the ranks' gradients and DDP averages them, which gives the gradient of
    that one loss). `[B, D]` normalised embeddings -> loss and i2t/t2i accuracy."""
    images, texts = gather(image_emb), gather(text_emb)  # [N, D]
    logits = scale * images @ texts.t()  # [N, N], row i: image i against every caption
    labels = torch.arange(len(logits), device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    return {"loss_itc": loss,
            "acc_i2t": (logits.argmax(1) == labels).float().mean(),
            "acc_t2i": (logits.argmax(0) == labels).float().mean()}


def itc_embeddings(backbone: VLMoBackbone, head: ITCHead, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    image_cls = backbone.encode_image(batch[B.IMAGE])[:, 0]  # [B, D]
    text_cls = backbone.encode_text(batch[B.INPUT_IDS], batch[B.ATTENTION_MASK])[:, 0]  # [B, D]
    return head.embed_image(image_cls), head.embed_text(text_cls)


class ImageTextITC(PretrainMode):
    name = "image_text_itc"
    description = "image-text contrastive learning on pairs"
    batch_keys = (B.IMAGE, B.INPUT_IDS, B.ATTENTION_MASK)
    data_kind = "pair"
    paths = frozenset({"image", "text"})
    heads = ("itc_head",)
    reads = frozenset({"image_views", "text", "itc", "pairs"})

    def __init__(self, backbone: VLMoBackbone, options: ModeOptions | None = None) -> None:
        super().__init__(backbone, options)
        self.itc_head = ITCHead(backbone.cfg.embed_dim)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        image_emb, text_emb = itc_embeddings(self.backbone, self.itc_head, batch)
        out = contrastive_loss(image_emb, text_emb, self.itc_head.scale(), self.options.gather)
        loss = out["loss_itc"]
        return {"loss": loss, **{k: v.detach() for k, v in out.items()}, "logit_scale": self.itc_head.scale().detach()}
