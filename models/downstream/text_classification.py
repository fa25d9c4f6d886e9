"""Text classification fine-tuning: the final-normed [CLS] feature of the text path + a linear
classifier, label smoothing in training; loss, top-1 and top-5 (percent) on held-out texts."""
from __future__ import annotations

import torch

from custom_datasets import batch as B
from models.backbone import VLMoBackbone
from models.classifier import TextClassifier
from models.downstream.base import DownstreamOptions, DownstreamTask
from models.downstream.image_classification import classification_criterion, classification_outputs


class TextClassification(DownstreamTask):
    name = "text_classification"
    description = "fine-tune on labelled texts (.csv text,label / .json / .jsonl)"
    data_kind = "labelled_text"
    paths = frozenset({"text"})
    heads = ("pooler_norm", "classifier")

    def __init__(self, backbone: VLMoBackbone, options: DownstreamOptions) -> None:
        super().__init__(TextClassifier(backbone, options.num_classes), options)
        self.criterion = classification_criterion(options, mixup=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(batch[B.INPUT_IDS], batch[B.ATTENTION_MASK]).float()
        return classification_outputs(self, logits, batch[B.LABEL])
