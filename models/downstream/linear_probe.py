"""Linear probing (MAE's protocol): the backbone is frozen, the mean-pooled features of one block are
computed once, and a BatchNorm (no affine) + linear head is trained on them."""
from __future__ import annotations

import torch
from torch import nn

from models.backbone import VLMoBackbone
from models.classifier import ImageClassifier
from models.downstream.base import DownstreamOptions, DownstreamTask


class ProbeHead(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.classifier = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(features))


class LinearProbe(DownstreamTask):
    name = "linear_probe"
    description = "frozen backbone, cached features of one block (--probe_layer), BatchNorm + linear head"
    data_kind = "image_folder"
    paths = frozenset({"image"})
    cached_features = True
    heads = ("pooler_norm", "classifier")

    def __init__(self, backbone: VLMoBackbone, options: DownstreamOptions) -> None:
        # the classifier layout, so a fine-tuned checkpoint reports its heads as the other image tasks do;
        # probing itself reads only `model.backbone` and trains a ProbeHead on cached features
        super().__init__(ImageClassifier(backbone, options.num_classes, options.use_cls), options)
