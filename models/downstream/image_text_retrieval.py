"""Image-text retrieval fine-tuning: the contrastive (ITC) objective with the full backbone on
image-caption pairs; on the held-out set, recall@1/5/10 in both directions with every caption of
an image counted, and their mean (which picks the best epoch)."""
from __future__ import annotations

import torch

from models.backbone import VLMoBackbone
from models.downstream.base import DownstreamOptions, DownstreamTask
from models.modes.base import ModeOptions
from models.modes.image_text_itc import ImageTextITC
from models.retrieval import pair_embeddings, recall_at_k


class ImageTextRetrieval(DownstreamTask):
    name = "image_text_retrieval"
    description = "fine-tune image-text contrastive retrieval on image-caption pairs; R@1/5/10 both ways"
    data_kind = "image_text_pairs"
    paths = frozenset({"image", "text"})
    heads = ("itc_head",)
    best_metric = "itc_r_mean"
    set_level_metrics = True

    def __init__(self, backbone: VLMoBackbone, options: DownstreamOptions, text_tokenizer=None, gather=None) -> None:
        super().__init__(ImageTextITC(backbone, ModeOptions(gather=gather or (lambda x: x))), options)
        self.text_tokenizer = text_tokenizer

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model(batch)

    @torch.no_grad()
    def evaluate_set(self, dataset, batch_size: int, device: torch.device) -> dict[str, float]:
        images, texts, owner = pair_embeddings(self.backbone, self.model.itc_head, dataset, self.text_tokenizer,
                                               self.options.max_text_len, batch_size, device)
        recalls = recall_at_k(images @ texts.t(), owner)
        return {**recalls, "itc_r_mean": sum(recalls.values()) / len(recalls)}
