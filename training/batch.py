"""The one batch preparer of training, evaluation, stage reports, probes and baselines: keeps the
fields a consumer needs, moves them to the device and computes the MIM targets with the visual
tokenizer (batched, no grad). Batches whose samples were all unreadable come out empty."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from common.metrics import with_progress
from custom_datasets import batch as B


class BatchPreparer:
    def __init__(self, device: torch.device, keys: Iterable[str], visual_tokenizer=None,
                 keep_tokenizer_image: bool = False) -> None:
        """`keep_tokenizer_image`: leave the tokenizer view in the batch (pictures draw it)."""
        self.device, self.visual_tokenizer, self.keep_tokenizer_image = device, visual_tokenizer, keep_tokenizer_image
        self.keys = set(keys) | {B.LABEL} | ({B.TOKENIZER_IMAGE} if visual_tokenizer is not None else set())

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()
               if isinstance(v, torch.Tensor) and k in self.keys}
        if self.visual_tokenizer is not None and B.TOKENIZER_IMAGE in out:
            view = out[B.TOKENIZER_IMAGE] if self.keep_tokenizer_image else out.pop(B.TOKENIZER_IMAGE)
            out[B.VISUAL_TOKENS] = self.visual_tokenizer.get_codebook_indices(view)
        return out

    def batches(self, loader: Iterable[dict[str, Any]], header: str = "evaluation") -> Iterator[dict[str, torch.Tensor]]:
        """Prepared non-empty batches of a loader (evaluation passes, with progress when long)."""
        for batch in with_progress(loader, header):
            batch.pop(B.NUM_SKIPPED, None)
            if batch:
                yield self(batch)


ALL_TENSOR_KEYS = (B.IMAGE, B.TOKENIZER_IMAGE, B.MASKED_PATCHES, B.INPUT_IDS, B.ATTENTION_MASK, B.MLM_INPUT_IDS,
                   B.MLM_LABELS, B.LABEL)
