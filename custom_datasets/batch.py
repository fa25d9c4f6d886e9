"""The batch every collate function produces and every mode, task, engine and probe reads: one
name per field, declared once. A batch is a `dict[str, Tensor]`; which fields it holds depends on the
data kind (images, captions, pairs, labelled images or texts)."""
from __future__ import annotations

from typing import TypedDict

import torch

IMAGE = "image"  # [B, 3, S, S] backbone view, normalised
TOKENIZER_IMAGE = "tokenizer_image"  # [B, 3, S2, S2] visual-tokenizer view in [0, 1]
MASKED_PATCHES = "bool_masked_pos"  # [B, N] True where a patch is replaced by the mask token
VISUAL_TOKENS = "visual_token_ids"  # [B, N] MIM targets, computed from TOKENIZER_IMAGE on the device
INPUT_IDS = "input_ids"  # [B, L] caption token ids ([CLS] ... [SEP] [PAD]...)
ATTENTION_MASK = "attention_mask"  # [B, L] 1 for real tokens, 0 for padding
MLM_INPUT_IDS = "mlm_input_ids"  # [B, L] INPUT_IDS with whole words masked
MLM_LABELS = "mlm_labels"  # [B, L] original ids where masked, IGNORE_INDEX elsewhere
LABEL = "label"  # [B] class index
SEG_MASK = "seg_mask"  # [B, H, W] class index per pixel, 255 where unlabelled (semantic segmentation)
IMAGE_2 = "image_2"  # [B, 3, S, S] the second image a text is about (NLVR2)
VQA_TARGETS = "vqa_targets"  # [B, answers] soft score of each vocabulary answer (training target)
VQA_SCORES = "vqa_scores"  # [B, answers] official VQA accuracy each vocabulary answer would get
QUESTION_ID = "question_id"  # [B] a VQA question's id (the results file names it)
ANSWER_TYPE = "answer_type"  # [B] index into yes/no, number, other (VQA's accuracy breakdown)
CAPTION = "caption"  # per sample: str or list[str]; replaced by INPUT_IDS in the collate
NUM_SKIPPED = "num_skipped"  # scalar tensor: unreadable samples dropped from this batch

IGNORE_INDEX = -100  # label of positions that are not predicted (PyTorch's cross-entropy default)


class Batch(TypedDict, total=False):
    image: torch.Tensor
    tokenizer_image: torch.Tensor
    bool_masked_pos: torch.Tensor
    visual_token_ids: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mlm_input_ids: torch.Tensor
    mlm_labels: torch.Tensor
    label: torch.Tensor
    seg_mask: torch.Tensor
    image_2: torch.Tensor
    vqa_targets: torch.Tensor
    vqa_scores: torch.Tensor
    question_id: torch.Tensor
    answer_type: torch.Tensor
    num_skipped: torch.Tensor


def batch_size(batch: dict) -> int:
    """Number of samples in a batch (any field but NUM_SKIPPED)."""
    return len(next(v for k, v in batch.items() if k != NUM_SKIPPED))
