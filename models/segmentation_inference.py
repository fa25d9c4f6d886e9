"""Whole-image, sliding-window and multi-scale + flip inference of a segmenter, as mmseg runs it.

The backbone's position tables are built for one crop size, so each forward sees exactly that size:
`whole` resizes the image to it, `slide` runs overlapping crops of it (padding the image up when it
is smaller) and averages the logits where they overlap. Multi-scale resizes the image by each ratio
first; the probabilities of every scale and flip are averaged at the output size."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from models.segmentation_head import resize

Model = Callable[[torch.Tensor], torch.Tensor]  # [B, 3, crop, crop] -> [B, C, crop, crop] logits
AUG_TEST_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # BEiT/mmseg's multi-scale test


def whole_logits(model: Model, images: torch.Tensor, crop: int) -> torch.Tensor:
    """The image resized to the crop size, logits resized back: `[B, C, H, W]`."""
    h, w = images.shape[-2:]
    if (h, w) == (crop, crop):
        return model(images)
    return resize(model(resize(images, (crop, crop))), (h, w))


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets covering `length` with windows of `crop` every `stride`, the last flush with
    the end (mmseg's grid)."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, length - crop), 0) for i in range(count)})


def slide_logits(model: Model, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Overlapping `crop` windows every `stride` pixels, logits averaged where windows overlap:
    `[B, C, H, W]`. Images smaller than a window are padded (and the padding cut off again)."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (0, max(crop - w, 0), 0, max(crop - h, 0)))
    ph, pw = padded.shape[-2:]
    total, count = None, padded.new_zeros(1, 1, ph, pw)
    for top in window_starts(ph, crop, stride):
        for left in window_starts(pw, crop, stride):
            logits = model(padded[..., top:top + crop, left:left + crop])  # [B, C, crop, crop]
            if total is None:
                total = padded.new_zeros(images.shape[0], logits.shape[1], ph, pw)
            total[..., top:top + crop, left:left + crop] += logits
            count[..., top:top + crop, left:left + crop] += 1
    return (total / count)[..., :h, :w]


def segment_probabilities(model: Model, images: torch.Tensor, crop: int, mode: str = "slide",
                          stride: int | None = None, ratios: Sequence[float] = (1.0,), flip: bool = False,
                          out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Class probabilities `[B, C, *out_size]` (default: the image's size), averaged over the
    scale ratios and, with `flip`, horizontal flips."""
    if mode not in ("slide", "whole"):
        raise ValueError(f"inference mode {mode!r}: use slide or whole")
    stride = stride or max(1, crop * 2 // 3)
    h, w = images.shape[-2:]
    out_size = out_size or (h, w)
    total = None
    for ratio in ratios:
        scaled = images if ratio == 1.0 else resize(images, (max(1, round(h * ratio)), max(1, round(w * ratio))))
        for flipped in ((False, True) if flip else (False,)):
            view = scaled.flip(-1) if flipped else scaled
            logits = slide_logits(model, view, crop, stride) if mode == "slide" else whole_logits(model, view, crop)
            probs = resize(logits.flip(-1) if flipped else logits, out_size).softmax(1)
            total = probs if total is None else total + probs
    return total / (len(ratios) * (2 if flip else 1))
