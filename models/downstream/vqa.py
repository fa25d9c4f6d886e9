"""Visual question answering as VLMo fine-tunes it on VQAv2: the question and the image fused in
one sequence, the pooled [CLS] classified over the answer vocabulary with binary cross-entropy
against soft scores (times the vocabulary size, as VLMo). Held out: the official VQA accuracy of
the top answer, overall and per answer type (yes/no, number, other), each question counted once
over all ranks; the answers go to `vqa_results.json` in the challenge's format
(`[{"question_id", "answer"}]`), which is all a split without annotations (test-dev) yields."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from common import distributed as dist_util
from custom_datasets import batch as B
from custom_datasets.vqa_data import ANSWER_TYPES
from models.backbone import VLMoBackbone
from models.downstream.base import DownstreamOptions
from models.downstream.fused_pair import FusedPairTask

RESULTS_FILE = "vqa_results.json"


class VisualQuestionAnswering(FusedPairTask):
    name = "vqa"
    description = ("answer questions about images (VQAv2's files and COCO folders): a classifier over the answer "
                   "vocabulary on the fused pair; official VQA accuracy and a results file")
    data_kind = "vqa"
    head_name = "vqa_head"
    best_metric = "vqa_acc"

    def __init__(self, backbone: VLMoBackbone, options: DownstreamOptions) -> None:
        super().__init__(backbone, options)
        self.answers = list(options.class_names)
        self.collected: list[tuple[torch.Tensor, ...]] = []
        self.results: list[dict[str, Any]] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model([batch[B.IMAGE]], batch[B.INPUT_IDS], batch[B.ATTENTION_MASK]).float()  # [B, answers]
        if B.VQA_TARGETS in batch:
            targets = batch[B.VQA_TARGETS].float()
            loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        else:  # a split without annotations: answers only
            loss = logits.new_zeros(())
        out = {"loss": loss}
        if not self.training:
            chosen = logits.argmax(1)  # [B]
            accuracy = None
            if B.VQA_SCORES in batch:
                accuracy = batch[B.VQA_SCORES].gather(1, chosen[:, None]).squeeze(1)  # [B] official accuracy
                out["vqa_acc"] = 100 * accuracy.mean()
            self.collected.append((batch[B.QUESTION_ID].cpu(), chosen.cpu(), batch[B.ANSWER_TYPE].cpu(),
                                   None if accuracy is None else accuracy.cpu()))
        return out

    def start_evaluation(self) -> None:
        self.collected, self.results = [], []

    def finish_evaluation(self, stats: dict[str, float]) -> dict[str, float]:
        """Accuracy over each question once (a distributed sampler repeats a few to even out the
        ranks), per answer type too; the results in question order."""
        rows = {}
        for part in dist_util.gather_objects(self.collected):
            for ids, chosen, kinds, accuracy in part:
                for i in range(len(ids)):
                    rows[int(ids[i])] = (int(chosen[i]), int(kinds[i]), None if accuracy is None else float(accuracy[i]))
        self.collected = []
        self.results = [{"question_id": qid, "answer": self.answers[rows[qid][0]]} for qid in sorted(rows)]
        scored = [row for row in rows.values() if row[2] is not None]
        if not scored:
            return {"answered": float(len(rows))}
        stats = {**stats, "vqa_acc": 100 * sum(r[2] for r in scored) / len(scored)}
        for index, kind in enumerate(ANSWER_TYPES):
            of_kind = [r[2] for r in scored if r[1] == index]
            if of_kind:
                stats[f"vqa_acc_{kind.replace('/', '_')}"] = 100 * sum(of_kind) / len(of_kind)
        return stats

    def held_out_outputs(self) -> dict[str, Any]:
        return {RESULTS_FILE: self.results} if self.results else {}
