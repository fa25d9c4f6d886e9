"""Image classification on the shared backbone, as BEiT fine-tunes: mean of the patch features
before the final norm + `pooler_norm` (BEiT's fc_norm) + linear `classifier`, or the final-normed
[CLS] feature with `use_cls`. The names match what the converter writes for fine-tuned BEiT/timm
checkpoints (they load with their heads) and the layout exports exactly to HF and timm BEiT."""
from __future__ import annotations

import torch
from torch import nn

from models.backbone import HoldsBackbone, VLMoBackbone


class ImageClassifier(HoldsBackbone, nn.Module):
    def __init__(self, backbone: VLMoBackbone, num_classes: int, use_cls: bool = False,
                 head_init_scale: float = 0.001) -> None:
        super().__init__()
        dim = backbone.cfg.embed_dim
        self.backbone, self.use_cls = backbone, use_cls
        self.pooler_norm = nn.Identity() if use_cls else nn.LayerNorm(dim, eps=backbone.cfg.layer_norm_eps)
        self.classifier = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)
        with torch.no_grad():  # BEiT: a small head at the start keeps early fine-tuning stable
            self.classifier.weight.mul_(head_init_scale)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.encode_image(images, apply_norm=self.use_cls)  # [B, 1+N, D]
        return tokens[:, 0] if self.use_cls else self.pooler_norm(tokens[:, 1:].mean(1))  # [B, D]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))  # [B, classes]


class TextClassifier(HoldsBackbone, nn.Module):
    """Text classification: the final-normed [CLS] feature of the text path + `pooler_norm` +
    linear `classifier` (the same head names as the image classifier)."""

    def __init__(self, backbone: VLMoBackbone, num_classes: int) -> None:
        super().__init__()
        dim = backbone.cfg.embed_dim
        self.backbone = backbone
        self.pooler_norm = nn.LayerNorm(dim, eps=backbone.cfg.layer_norm_eps)
        self.classifier = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        cls = self.backbone.encode_text(input_ids, attention_mask)[:, 0]  # [B, D]
        return self.classifier(self.pooler_norm(cls))  # [B, classes]
