"""Image-text retrieval fine-tuning: the contrastive (ITC) objective with the full backbone on
image-caption pairs; on the held-out set, recall@1/5/10 in both directions with every caption of
an image counted, and their mean (which picks the best epoch). With `rerank_k` (VLMo), the matching
head trains too (ITM with hard negatives, added to the ITC loss) and re-orders each contrastive
shortlist of k on the fused pair; both rankings are reported and the re-ranked mean picks the
best epoch."""
from __future__ import annotations

import logging

import torch

from models.backbone import VLMoBackbone
from models.downstream.base import DownstreamOptions, DownstreamTask
from models.heads import ITMHead, Pooler
from models.modes.base import ModeOptions
from models.modes.image_text_itc import ImageTextITC
from models.modes.image_text_itm import itm_logits, matching_outputs
from models.retrieval import PairInputs, pair_embeddings, recall_at_k, reranked_recalls, trivial_recall_note


log = logging.getLogger(__name__)


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
        self.rerank_k = options.rerank_k
        if self.rerank_k:  # the matching head lives in the model, so checkpoints carry it
            dim = backbone.cfg.embed_dim
            self.model.pooler, self.model.itm_head = Pooler(dim), ITMHead(dim)
            self.heads, self.paths = ("itc_head", "pooler", "itm_head"), frozenset({"image", "text", "pair"})
            self.best_metric = "rerank_r_mean"
        self.steps = 0
        self.said_trivial = False

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.model(batch)
        if not self.rerank_k:
            return out
        self.steps += self.training
        generator = torch.Generator().manual_seed(7919 + self.steps)
        m = self.model
        matching = matching_outputs(self.backbone, m.itc_head, m.pooler, m.itm_head, batch, m.options.gather, generator)
        return {**out, "loss": out["loss"] + matching["loss_itm"], "loss_itm": matching["loss_itm"].detach(),
                "acc_itm": matching["acc_itm"]}

    @torch.no_grad()
    def evaluate_set(self, dataset, batch_size: int, device: torch.device) -> dict[str, float]:
        keep = PairInputs() if self.rerank_k else None
        images, texts, owner = pair_embeddings(self.backbone, self.model.itc_head, dataset, self.text_tokenizer,
                                               self.options.max_text_len, batch_size, device, keep)
        similarity = images @ texts.t()
        recalls = recall_at_k(similarity, owner)
        if (note := trivial_recall_note(*similarity.shape)) is not None and not self.said_trivial:
            log.warning("retrieval: %s", note)
            self.said_trivial = True  # once a run, not every epoch
        stats = {**recalls, "itc_r_mean": sum(recalls.values()) / len(recalls)}
        if self.rerank_k:
            pixels, ids, mask = keep.tensors()
            m = self.model

            def score(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
                logits = itm_logits(self.backbone, m.pooler, m.itm_head, pixels[image_index.cpu()].to(device),
                                    ids[text_index.cpu()].to(device), mask[text_index.cpu()].to(device))
                return logits[:, 1] - logits[:, 0]

            again = reranked_recalls(similarity, owner, self.rerank_k, score)
            stats.update({**again, "rerank_r_mean": sum(again.values()) / len(again)})
        return stats
