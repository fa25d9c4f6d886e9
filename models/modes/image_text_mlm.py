"""Image-conditioned masked language modeling (VLMo's MLM on pairs): masked words of a caption are
predicted from the fused sequence, so the picture can tell which colour or shape was hidden. The
whole-word masks come from the collate, as in text_mlm; only the text tokens are scored. Everything
but where the words are read from is text_mlm's."""
from __future__ import annotations

import torch

from custom_datasets import batch as B
from models.backbone import VLMoBackbone
from models.heads import MLMHead
from models.modes.text_mlm import TextMLM, masked_token_logits


def fused_mlm_logits(backbone: VLMoBackbone, head: MLMHead, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits `[M, vocab]`, target ids `[M]`) of the M masked caption tokens, read from the text
    part of the fused [text; image] sequence."""
    ids = batch[B.MLM_INPUT_IDS]
    fused = backbone.encode_pair(batch[B.IMAGE], ids, batch[B.ATTENTION_MASK])  # [B, L+1+N, D]
    return masked_token_logits(head, fused[:, :ids.shape[1]], batch[B.MLM_LABELS])


class ImageTextMLM(TextMLM):
    name = "image_text_mlm"
    description = "masked language modeling of captions fused with their image (VLMo)"
    batch_keys = (B.IMAGE, B.MLM_INPUT_IDS, B.ATTENTION_MASK, B.MLM_LABELS)
    data_kind = "pair"
    paths = frozenset({"image", "text", "pair"})
    reads = frozenset({"image_views", "text", "mlm", "pairs"})

    def masked_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_mlm_logits(self.backbone, self.mlm_head, batch)
