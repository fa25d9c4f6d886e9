"""What VQA and NLVR2 share (VLMo's fusion tasks): a fused-pair classifier whose head `head_name`
names, trained through the image, text and pair paths; its pooler is loaded from a matching stage's
checkpoint when that has one."""
from __future__ import annotations

from typing import ClassVar

from models.backbone import VLMoBackbone
from models.downstream.base import DownstreamOptions, DownstreamTask
from models.fusion_classifier import FusedPairClassifier


class FusedPairTask(DownstreamTask):
    paths = frozenset({"image", "text", "pair"})
    head_name: ClassVar[str] = ""  # a key of FUSION_HEADS
    num_outputs: ClassVar[int | None] = None  # None: the data's classes (VQA: the answer vocabulary)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.heads = ("pooler", cls.head_name)

    def __init__(self, backbone: VLMoBackbone, options: DownstreamOptions) -> None:
        outputs = self.num_outputs or options.num_classes
        super().__init__(FusedPairClassifier(backbone, self.head_name, outputs), options)
