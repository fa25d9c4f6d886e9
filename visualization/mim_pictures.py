"""What masked image modeling sees and predicts, as a picture: for each held-out image, the input,
the input with its masked patches greyed out, the visual tokens of the whole image drawn back as
pixels (the best a perfect model could show), and the model's prediction (visible patches as they
were, masked patches drawn from the predicted tokens)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from custom_datasets import batch as B
from models.modes.image_mim import mim_logits
from visualization.canvas import grid, to_rgb

COLUMNS = ["input", "masked", "target tokens", "predicted"]


def checkerboard(like: torch.Tensor) -> torch.Tensor:
    """A grey/white pixel checkerboard the shape of `like` ([B, C, S, S]): masked patches drawn
    with it cannot be mistaken for a flat grey background."""
    s = like.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    board = torch.where((yy + xx) % 2 == 0, 0.45, 0.8).to(like)
    return board.expand_as(like)


def patch_mask_pixels(mask: torch.Tensor, grid_hw: tuple[int, int], size: int) -> torch.Tensor:
    """`[B, h*w]` patch mask -> `[B, 1, size, size]` pixel mask (True where masked)."""
    patches = mask.reshape(-1, 1, *grid_hw).float()
    return F.interpolate(patches, size=(size, size), mode="nearest").bool()


@torch.no_grad()
def mim_reconstruction(backbone, head, batch: dict[str, torch.Tensor], render: Callable[[torch.Tensor], torch.Tensor],
                       grid_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The four columns as `[B, C, S, S]` pixels at the tokenizer's resolution. `render` draws
    `[B, h*w]` token ids as pixels; `batch` holds the tokenizer view and its visual tokens."""
    pixels = batch[B.TOKENIZER_IMAGE].float()
    mask = batch[B.MASKED_PATCHES].flatten(1).bool()
    logits, _ = mim_logits(backbone, head, batch)
    predicted_ids = batch[B.VISUAL_TOKENS].clone()
    predicted_ids[mask] = logits.argmax(-1)
    where = patch_mask_pixels(mask, grid_hw, pixels.shape[-1]).to(pixels.device)
    target = render(batch[B.VISUAL_TOKENS]).to(pixels)
    predicted = render(predicted_ids).to(pixels)
    return {"input": pixels, "masked": torch.where(where, checkerboard(pixels), pixels),
            "target tokens": target, "predicted": torch.where(where, predicted, pixels)}


def reconstruction_picture(columns: dict[str, torch.Tensor], rows: int = 8, min_cell: int = 128) -> Image.Image:
    """A grid: one row per image, the columns of `mim_reconstruction`; small images are enlarged to
    at least `min_cell` pixels."""
    size = columns["input"].shape[-1]
    scale = max(1, -(-min_cell // size))
    count = min(rows, columns["input"].shape[0])
    return grid([[to_rgb(columns[name][i], scale) for name in COLUMNS] for i in range(count)], COLUMNS)
