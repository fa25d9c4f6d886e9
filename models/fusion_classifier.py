"""Classifiers on the fused image-text pair (VLMo's VQA and NLVR2 models): each (image, text) pair
goes through the backbone as one sequence, its [CLS] through the pooler; the pooled features of a
text's images (one for VQA, two for NLVR2, in order) are concatenated and classified by an
AnswerHead. The head's attribute name says the task (`vqa_head`, `nlvr2_head`), so a checkpoint
describes itself."""
from __future__ import annotations

import torch
from torch import nn

from models.backbone import HoldsBackbone, VLMoBackbone
from models.heads import AnswerHead, Pooler

FUSION_HEADS = {"vqa_head": 1, "nlvr2_head": 2}  # head name -> images per text


class FusedPairClassifier(HoldsBackbone, nn.Module):
    def __init__(self, backbone: VLMoBackbone, head_name: str, num_outputs: int, pooler: Pooler | None = None,
                 head: AnswerHead | None = None) -> None:
        super().__init__()
        if head_name not in FUSION_HEADS:
            raise ValueError(f"unknown fusion head {head_name!r}; known: {', '.join(FUSION_HEADS)}")
        dim = backbone.cfg.embed_dim
        self.backbone, self.head_name, self.images_per_text = backbone, head_name, FUSION_HEADS[head_name]
        self.pooler = pooler or Pooler(dim)
        setattr(self, head_name, head or AnswerHead(dim * self.images_per_text, 2 * dim, num_outputs))

    @property
    def task(self) -> str:
        """"vqa" or "nlvr2": the task the head was trained for."""
        return self.head_name.removesuffix("_head")

    @property
    def head(self) -> AnswerHead:
        return getattr(self, self.head_name)

    @property
    def num_classes(self) -> int:
        return self.head.num_outputs

    def forward(self, images: list[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`images_per_text` tensors `[B, 3, H, W]`, the text `[B, L]` -> logits `[B, outputs]`."""
        if len(images) != self.images_per_text:
            raise ValueError(f"{self.head_name} reads {self.images_per_text} image(s) per text, got {len(images)}")
        count = len(images)
        pooled = self.pooler(self.backbone.encode_pair(torch.cat(images), input_ids.repeat(count, 1),
                                                       attention_mask.repeat(count, 1)))  # [count*B, D]
        batch = input_ids.shape[0]
        pooled = pooled.view(count, batch, -1).transpose(0, 1).reshape(batch, -1)  # [B, count*D], image order kept
        return self.head(pooled)
