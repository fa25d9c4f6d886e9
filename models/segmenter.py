"""Semantic segmentation on the shared backbone: the patch features of four blocks, laid out as
maps, through `seg_head` (models/segmentation_head.py). `forward` gives per-pixel logits at the
input's size; `head_logits` gives what the losses read (decoder and auxiliary logits at their own
resolutions)."""
from __future__ import annotations

import torch
from torch import nn

from models.backbone import HoldsBackbone, VLMoBackbone
from models.segmentation_head import SegmentationHead, resize


class Segmenter(HoldsBackbone, nn.Module):
    def __init__(self, backbone: VLMoBackbone, head: SegmentationHead) -> None:
        super().__init__()
        if head.embed_dim != backbone.cfg.embed_dim:
            raise ValueError(f"segmentation head built for width {head.embed_dim}, backbone is {backbone.cfg.embed_dim}")
        self.backbone, self.seg_head = backbone, head

    @property
    def num_classes(self) -> int:
        return self.seg_head.num_classes

    def head_logits(self, images: torch.Tensor, with_aux: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        gh, gw = images.shape[-2] // self.backbone.cfg.patch_size, images.shape[-1] // self.backbone.cfg.patch_size
        levels = [tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)  # [B, D, gh, gw]
                  for tokens in self.backbone.image_block_outputs(images, self.seg_head.block_indices)]
        return self.seg_head(levels, with_aux)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` -> `[B, classes, H, W]` logits."""
        return resize(self.head_logits(images)[0], images.shape[-2:])
