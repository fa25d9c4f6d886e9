"""Image classification fine-tuning, as BEiT fine-tunes: mean-pooled patch features (or [CLS]) +
a linear classifier, Mixup/CutMix and label smoothing in training; loss, top-1 and top-5 (percent)
on held-out images."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from custom_datasets import batch as B
from models.backbone import VLMoBackbone
from models.classifier import ImageClassifier
from models.downstream.base import DownstreamOptions, DownstreamTask


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, torch.Tensor]:
    """Top-k accuracy in percent, for the k below the number of classes (top-5 of 2 classes would
    always be 100)."""
    ks = [k for k in ks if k == 1 or k < logits.shape[1]]
    top = logits.topk(max(ks), dim=1).indices  # [B, k]
    hits = top == labels[:, None]
    # float32 mean, then percent in float64 (the values logs have always shown)
    return {f"acc{k}": hits[:, :k].any(1).float().mean().double() * 100 for k in ks}


def classification_criterion(options: DownstreamOptions, mixup: bool):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(options.smoothing) if options.smoothing > 0 else torch.nn.CrossEntropyLoss()


def classification_outputs(task: DownstreamTask, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Training: the task's criterion (smoothing / soft Mixup targets), and top-1 on the training
    views when the labels are hard (whether the recipe fits its training set). Evaluation: plain
    cross-entropy, top-1 and top-5."""
    if task.training:
        fit = topk_accuracy(logits.detach(), labels, ks=(1,)) if labels.ndim == 1 else {}
        return {"loss": task.criterion(logits, labels), **fit}
    return {"loss": F.cross_entropy(logits, labels), **topk_accuracy(logits, labels)}


class ImageClassification(DownstreamTask):
    name = "image_classification"
    description = "fine-tune the backbone and a linear classifier on train/<class>/ and val/<class>/ folders"
    data_kind = "image_folder"
    paths = frozenset({"image"})
    heads = ("pooler_norm", "classifier")

    def __init__(self, backbone: VLMoBackbone, options: DownstreamOptions) -> None:
        super().__init__(ImageClassifier(backbone, options.num_classes, options.use_cls), options)
        self.mixup = None
        if options.mixup > 0 or options.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=options.mixup, cutmix_alpha=options.cutmix, prob=options.mixup_prob,
                               switch_prob=options.mixup_switch_prob, label_smoothing=options.smoothing,
                               num_classes=options.num_classes)
        self.criterion = classification_criterion(options, self.mixup is not None)

    def frozen_parameter_names(self) -> list[str]:
        unused = super().frozen_parameter_names()
        if not self.model.use_cls:  # mean pooling skips the final norm (as BEiT)
            unused += [n for n, _ in self.model.named_parameters() if n.startswith("backbone.norm.")]
        return unused

    def prepare_train_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.mixup is None:
            return batch
        images, labels = batch[B.IMAGE], batch[B.LABEL]
        if len(labels) % 2:  # timm's Mixup pairs samples and needs an even batch
            images, labels = images[:-1], labels[:-1]
        images, targets = self.mixup(images, labels)
        return {**batch, B.IMAGE: images, B.LABEL: targets}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return classification_outputs(self, self.model(batch[B.IMAGE]).float(), batch[B.LABEL])
