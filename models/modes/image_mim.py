"""BEiT masked image modeling: predict the visual token of every masked patch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.errors import UserError
from custom_datasets import batch as B
from models.backbone import VLMoBackbone
from models.heads import MIMHead
from models.modes.base import ModeOptions, PretrainMode
from models.patch_aggregation import PatchAggregationHead


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
    reads = frozenset({"image_views", "masking", "visual_tokens", "patch_aggregation"})

    def __init__(self, backbone: VLMoBackbone, options: ModeOptions) -> None:
        super().__init__(backbone, options)
        if not options.visual_vocab_size:
            raise ValueError("image_mim needs ModeOptions.visual_vocab_size")
        self.mim_head = MIMHead(backbone.cfg.embed_dim, options.visual_vocab_size)
        self.cls_pt_head = None
        if options.patch_aggregation is not None:  # BEiT v2's: (early layers, head layers, shared LM head)
            early, layers, shared = options.patch_aggregation
            if not 1 <= early <= backbone.cfg.depth:
                raise UserError(f"--early_layers {early}: the backbone has blocks 1..{backbone.cfg.depth}")
            self.cls_pt_head = PatchAggregationHead(backbone.cfg.to_dict(), early, layers, shared,
                                                    options.visual_vocab_size)
            self.heads = ("mim_head", "cls_pt_head")

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        if self.cls_pt_head is None:
            loss, acc = mim_loss(self.backbone, self.mim_head, batch)
            return {"loss": loss, "loss_mim": loss.detach(), "acc_mim": acc}
        (logits, aggregated), labels = aggregated_mim_logits(self.backbone, self.mim_head, self.cls_pt_head, batch)
        loss, loss_agg = F.cross_entropy(logits, labels), F.cross_entropy(aggregated, labels)
        return {"loss": loss + loss_agg, "loss_mim": loss.detach(), "loss_mim_agg": loss_agg.detach(),
                "acc_mim": (logits.argmax(-1) == labels).float().mean(),
                "acc_mim_agg": (aggregated.argmax(-1) == labels).float().mean()}


def aggregated_mim_logits(backbone: VLMoBackbone, head: MIMHead, aggregation: PatchAggregationHead,
                          batch: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """((top logits, patch-aggregation logits) `[M, V]` each, target ids `[M]`) of the masked
    patches: BEiT v2's two predictions, each trained with cross-entropy and summed."""
    mask = batch[B.MASKED_PATCHES].flatten(1).bool()  # [B, N]
    last = len(backbone.blocks) - 1
    early, top = backbone.image_block_outputs(batch[B.IMAGE], (aggregation.early_layers - 1, last), mask)
    logits = head(backbone.norm(top)[:, 1:][mask]).float()
    aggregated = aggregation.predict(aggregation(top, early)[:, 1:][mask], backbone.norm, head).float()
    return (logits, aggregated), batch[B.VISUAL_TOKENS][mask]
