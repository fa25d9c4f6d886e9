"""Colour-mapped segmentation masks, overlays on the image, and the input | ground truth |
prediction panel that fine-tuning writes to TensorBoard and pictures/."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from common.confusion_matrix import SEG_IGNORE
from visualization.canvas import grid, to_rgb

UNLABELLED = (0, 0, 0)


def palette(num_classes: int) -> np.ndarray:
    """`[num_classes, 3]` uint8 colours, the same for a class in every run: the background class
    (index 0) grey, the rest spread around the hue circle by the golden ratio, so neighbours differ."""
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    hsv = np.stack([hues * 255, np.full(num_classes, 200), np.where(np.arange(num_classes) % 2, 230, 170)], 1)
    colours = np.asarray(Image.fromarray(hsv.astype(np.uint8)[None], "HSV").convert("RGB"))[0].copy()
    if num_classes:
        colours[0] = (120, 120, 120)
    return colours


def colour_mask(mask: np.ndarray | torch.Tensor, num_classes: int) -> Image.Image:
    """`[H, W]` class indices -> RGB; unlabelled pixels (255) black."""
    mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask).astype(np.int64)
    table = np.concatenate([palette(num_classes), np.array([UNLABELLED], dtype=np.uint8)])
    index = np.where((mask >= 0) & (mask < num_classes), mask, num_classes)
    index[mask == SEG_IGNORE] = num_classes
    return Image.fromarray(table[index])


def overlay(image: Image.Image, coloured: Image.Image, alpha: float = 0.5) -> Image.Image:
    return Image.blend(image.convert("RGB"), coloured.resize(image.size, Image.NEAREST), alpha)


def segmentation_panel(images: list[torch.Tensor], truths: list[torch.Tensor], predictions: list[torch.Tensor],
                       num_classes: int, cell: int = 160) -> Image.Image:
    """Rows of input | ground truth | prediction; `images` in [0, 1], `[3, H, W]`, at the masks' size."""
    rows = []
    for image, truth, predicted in zip(images, truths, predictions):
        picture = to_rgb(image)
        scale = cell / max(picture.size)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        cells = [picture.resize(size, Image.BILINEAR)] + [colour_mask(m, num_classes).resize(size, Image.NEAREST)
                                                          for m in (truth, predicted)]
        rows.append([padded(c, cell) for c in cells])
    return grid(rows, ["input", "ground truth", "prediction"])


def padded(image: Image.Image, cell: int) -> Image.Image:
    canvas = Image.new("RGB", (cell, cell), (255, 255, 255))
    canvas.paste(image, (0, 0))
    return canvas
