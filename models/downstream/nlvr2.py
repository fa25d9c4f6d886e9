"""NLVR2 as VLMo fine-tunes it: the statement fused with each of its two images, the two pooled
[CLS] features concatenated (left, right) and classified true / false with cross-entropy;
accuracy on the held-out split."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from custom_datasets import batch as B
from models.downstream.fused_pair import FusedPairTask


class NLVR2(FusedPairTask):
    name = "nlvr2"
    description = ("is a statement true of two images (NLVR2's JSON Lines and image folders): both fused pairs' "
                   "pooled features, concatenated, classified; accuracy")
    data_kind = "nlvr2"
    head_name = "nlvr2_head"
    num_outputs = 2  # false, true
    best_metric = "acc1"

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model([batch[B.IMAGE], batch[B.IMAGE_2]], batch[B.INPUT_IDS], batch[B.ATTENTION_MASK]).float()
        labels = batch[B.LABEL]
        return {"loss": F.cross_entropy(logits, labels), "acc1": 100 * (logits.argmax(1) == labels).float().mean()}
