"""Caption tokenization (the one place it happens) and the collate for samples that carry captions:
tokenizes them (and MLM-masks them) in the DataLoader worker, collates the other fields, and drops
and counts unreadable samples."""
from __future__ import annotations

import random
from typing import Any

import torch
from torch.utils.data import default_collate

from custom_datasets import batch as B
from custom_datasets.text_masking import WholeWordMasker


def tokenize_captions(tokenizer, captions: list[str], max_text_len: int):
    """Captions -> padded (to the longest) and truncated encodings with `input_ids`,
    `attention_mask` `[B, L]` and `word_ids(i)` (which whole-word masking needs)."""
    return tokenizer(captions, padding="longest", truncation=True, max_length=max_text_len, return_tensors="pt")


class CaptionCollator:
    """-> `input_ids`, `attention_mask` `[B, L]` (+ `mlm_input_ids`, `mlm_labels` with a masker), the
    other sample fields collated, and `num_skipped`. A sample with several captions contributes a
    random one (training) or its first (evaluation)."""

    def __init__(self, tokenizer, max_text_len: int, masker: WholeWordMasker | None = None, train: bool = True) -> None:
        self.tokenizer, self.max_text_len, self.masker, self.train = tokenizer, max_text_len, masker, train

    def _caption(self, caption: str | list[str]) -> str:
        if isinstance(caption, str):
            return caption
        return random.choice(caption) if self.train else caption[0]

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any]:
        good = [s for s in samples if s is not None]
        batch: dict[str, Any] = {B.NUM_SKIPPED: torch.tensor(len(samples) - len(good))}
        if not good:
            return batch
        captions = [self._caption(s[B.CAPTION]) for s in good]
        rest = [{k: v for k, v in s.items() if k != B.CAPTION} for s in good]
        if rest[0]:
            batch.update(default_collate(rest))
        enc = tokenize_captions(self.tokenizer, captions, self.max_text_len)
        batch[B.INPUT_IDS], batch[B.ATTENTION_MASK] = enc["input_ids"], enc["attention_mask"]
        if self.masker is not None:
            word_ids = [enc.word_ids(i) for i in range(len(captions))]
            batch[B.MLM_INPUT_IDS], batch[B.MLM_LABELS] = self.masker(enc["input_ids"], word_ids)
        return batch
