"""Image-conditioned masked language modeling (VLMo's MLM on pairs): masked words of a caption are
predicted from the fused sequence, so the picture can tell which colour or shape was hidden. The
whole-word masks come from the collate, as in text_mlm; only the text tokens are scored."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from custom_datasets import batch as B
from models.backbone import VLMoBackbone
from models.heads import MLMHead
from models.modes.base import ModeOptions, PretrainMode


def fused_mlm_logits(backbone: VLMoBackbone, head: MLMHead, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits `[M, vocab]`, target ids `[M]`) of the M masked caption tokens, read from the text
    part of the fused [text; image] sequence."""
    ids = batch[B.MLM_INPUT_IDS]
    fused = backbone.encode_pair(batch[B.IMAGE], ids, batch[B.ATTENTION_MASK])  # [B, L+1+N, D]
    labels = batch[B.MLM_LABELS]  # [B, L]
    selected = labels != B.IGNORE_INDEX
    return head(fused[:, :ids.shape[1]][selected]).float(), labels[selected]


class ImageTextMLM(PretrainMode):
    name = "image_text_mlm"
    description = "masked language modeling of captions fused with their image (VLMo)"
    batch_keys = (B.IMAGE, B.MLM_INPUT_IDS, B.ATTENTION_MASK, B.MLM_LABELS)
    data_kind = "pair"
    paths = frozenset({"image", "text", "pair"})
    heads = ("mlm_head",)
    needs_mlm_masks = True

    def __init__(self, backbone: VLMoBackbone, options: ModeOptions | None = None) -> None:
        super().__init__(backbone, options)
        self.mlm_head = MLMHead(backbone.cfg.embed_dim, backbone.cfg.vocab_size, backbone.cfg.layer_norm_eps)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        logits, target = fused_mlm_logits(self.backbone, self.mlm_head, batch)
        loss = F.cross_entropy(logits, target)
        return {"loss": loss, "loss_mlm": loss.detach(), "acc_mlm": (logits.argmax(-1) == target).float().mean()}
