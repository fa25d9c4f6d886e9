"""A checkpoint alone, ready to serve: the model (a classifier when the file holds one, else the
backbone), its heads (ITC for search, ...), class names, the held-out image preprocessing and the
text tokenizer, all read from what the file records about itself (older files: from their saved
flags, else the defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from common.checkpoint_io import Checkpoint
from models import create_model
from models.backbone import HoldsBackbone
from models.checkpoints import read_model_checkpoint
from models.classifier import ImageClassifier
from models.fusion_classifier import FUSION_HEADS, FusedPairClassifier
from models.head_loading import load_head, load_head_into
from models.run_info import preprocessing, tokenizer_from_record
from models.segmenter import Segmenter


@dataclass
class CheckpointServable:
    model: nn.Module  # ImageClassifier, Segmenter, FusedPairClassifier (VQA, NLVR2), or the backbone
    class_names: list[str] | None
    preprocessing: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    heads: dict[str, nn.Module] = field(default_factory=dict)
    source: str = ""

    @property
    def backbone(self):
        return self.model.backbone if isinstance(self.model, HoldsBackbone) else self.model

    @property
    def has_classifier(self) -> bool:
        return isinstance(self.model, ImageClassifier)

    @property
    def has_segmenter(self) -> bool:
        return isinstance(self.model, Segmenter)

    @property
    def fusion_task(self) -> str | None:
        """"vqa" or "nlvr2" for a fused-pair classifier, else None."""
        return self.model.task if isinstance(self.model, FusedPairClassifier) else None

    @property
    def has_itc(self) -> bool:
        return "itc_head" in self.heads

    @property
    def num_classes(self) -> int:
        if self.has_segmenter or self.fusion_task:
            return self.model.num_classes
        return self.model.classifier.out_features if self.has_classifier else 0

    @property
    def max_text_len(self) -> int:
        return int(self.info.get("max_text_len", 40))

    def to(self, device: torch.device) -> "CheckpointServable":
        self.device = device
        self.model.to(device)
        for head in self.heads.values():
            head.to(device)
        return self

    def text_tokenizer(self, override: str | None = None):
        """--tokenizer when given, else the tokenizer the file embeds; None when it has none."""
        from models.text_tokenizer import load_text_tokenizer

        if override:
            return load_text_tokenizer(override)
        record = self.info.get("text_tokenizer")
        return tokenizer_from_record(record) if record else None

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self._device())).float().cpu()

    @torch.no_grad()
    def fused_logits(self, images: list[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A text with its image(s) (one for VQA, left and right for NLVR2) -> `[B, outputs]` logits."""
        device = self._device()
        return self.model([i.to(device) for i in images], input_ids.to(device), attention_mask.to(device)).float().cpu()

    @torch.no_grad()
    def segment_logits(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, crop, crop]` -> `[B, classes, crop, crop]` (the call sliding-window inference repeats)."""
        return self.model(images.to(self._device())).float().cpu()

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        cls = self.backbone.encode_image(images.to(self._device()))[:, 0]
        return self.heads["itc_head"].embed_image(cls).cpu()

    @torch.no_grad()
    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        cls = self.backbone.encode_text(input_ids.to(self._device()), attention_mask.to(self._device()))[:, 0]
        return self.heads["itc_head"].embed_text(cls).cpu()

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


def recorded_preprocessing(ckpt: Checkpoint, image_size: int, crop_pct: float) -> dict[str, Any]:
    if "preprocessing" in ckpt.info:
        return dict(ckpt.info["preprocessing"])
    args = ckpt.extra.get("args") or {}  # files written before checkpoints described themselves
    return preprocessing(image_size, float(args.get("crop_pct", crop_pct)),
                         bool(args.get("imagenet_default_mean_and_std", False)))


def load_checkpoint_servable(path: str, ckpt: Checkpoint | None = None) -> CheckpointServable:
    """`ckpt`: the file already read. Classifiers come with their class names; every head the file
    holds (ITC for search, ...) is loaded too."""
    ckpt = ckpt or read_model_checkpoint(path)
    backbone = create_model(None, pretrained=path, checkpoint=ckpt)
    classifier = "classifier.weight" in ckpt.model
    pre = recorded_preprocessing(ckpt, backbone.cfg.img_size, 0.875 if classifier else 1.0)
    heads = {name: head.eval() for name in ("itc_head", "mim_head", "mlm_head", "pooler", "itm_head", "seg_head",
                                            *FUSION_HEADS) if (head := load_head(ckpt, name, backbone.cfg)) is not None}
    names = ckpt.info.get("class_names") or ckpt.extra.get("class_names")
    fusion = next((name for name in FUSION_HEADS if name in heads), None)
    if fusion is not None and "pooler" in heads:
        model = FusedPairClassifier(backbone, fusion, 0, pooler=heads.pop("pooler"), head=heads.pop(fusion))
        return CheckpointServable(model.eval(), list(names) if names else None, pre, ckpt.info, heads, str(path))
    if "seg_head" in heads:
        segmenter = Segmenter(backbone, heads.pop("seg_head"))
        return CheckpointServable(segmenter.eval(), list(names) if names else None, pre, ckpt.info, heads, str(path))
    if not classifier:
        return CheckpointServable(backbone.eval(), None, pre, ckpt.info, heads, str(path))
    args = ckpt.extra.get("args") or {}
    use_cls = bool(ckpt.info.get("use_cls", args.get("use_cls", False)))
    model = ImageClassifier(backbone, ckpt.model["classifier.weight"].shape[0], use_cls)
    for head in ("pooler_norm", "classifier"):
        load_head_into(getattr(model, head), ckpt, head)
    return CheckpointServable(model.eval(), list(names) if names else None, pre, ckpt.info, heads, str(path))
