"""Whole-word masking for MLM (BERT's 80/10/10 rule), applied in the DataLoader collate."""
from __future__ import annotations

import random

import torch

from custom_datasets.batch import IGNORE_INDEX


class WholeWordMasker:
    """Masks about `mlm_probability` of each caption's tokens, whole words at a time: every piece of a
    chosen word gets the same treatment (80% [MASK], 10% a random token, 10% kept). Special and
    padding tokens are never chosen. Uses Python's `random` (seeded per DataLoader worker)."""

    def __init__(self, mask_token_id: int, vocab_size: int, special_ids: list[int], mlm_probability: float = 0.15) -> None:
        if not 0 < mlm_probability < 1:
            raise ValueError("mlm_probability must be in (0, 1)")
        self.mask_token_id, self.probability = mask_token_id, mlm_probability
        special = set(special_ids)
        self.replacement_ids = [i for i in range(vocab_size) if i not in special]

    def mask_sequence(self, ids: list[int], word_ids: list[int | None]) -> tuple[list[int], list[int]]:
        words: dict[int, list[int]] = {}
        for position, word in enumerate(word_ids):
            if word is not None:  # None: [CLS], [SEP], [PAD]
                words.setdefault(word, []).append(position)
        n_tokens = sum(len(p) for p in words.values())
        labels = [IGNORE_INDEX] * len(ids)
        if n_tokens == 0:
            return list(ids), labels
        budget = max(1, round(n_tokens * self.probability))
        chosen, covered = [], 0
        for word in random.sample(sorted(words), len(words)):
            if covered + len(words[word]) > budget and chosen:
                continue
            chosen.append(word)
            covered += len(words[word])
            if covered >= budget:
                break
        out = list(ids)
        for word in chosen:
            roll = random.random()
            for position in words[word]:
                labels[position] = ids[position]
                if roll < 0.8:
                    out[position] = self.mask_token_id
                elif roll < 0.9:
                    out[position] = random.choice(self.replacement_ids)
        return out, labels

    def __call__(self, input_ids: torch.Tensor, word_ids: list[list[int | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, L]` ids and per-row word ids -> (masked ids `[B, L]`, labels `[B, L]` with -100 where not masked)."""
        rows = [self.mask_sequence(row.tolist(), words) for row, words in zip(input_ids, word_ids)]
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


def masker_for(tokenizer, mlm_probability: float) -> WholeWordMasker:
    return WholeWordMasker(tokenizer.mask_token_id, len(tokenizer), tokenizer.all_special_ids, mlm_probability)
