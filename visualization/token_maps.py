"""What a visual tokenizer makes of an image: each patch coloured by its token id, next to the
image (the same colour is the same token in every row)."""
from __future__ import annotations

import torch
from PIL import Image

from visualization.canvas import grid, to_rgb
from visualization.segmentation_pictures import colour_mask


def token_map_picture(images: torch.Tensor, ids: torch.Tensor, vocab_size: int, cell: int = 160) -> Image.Image:
    """`[B, 3, S, S]` pixels in [0, 1] and their `[B, g*g]` token ids -> rows of (image, token map)."""
    side = int(ids.shape[1] ** 0.5)
    rows = []
    for image, tokens in zip(images, ids):
        picture = to_rgb(image).resize((cell, cell), Image.BICUBIC)
        tokens_map = colour_mask(tokens.reshape(side, side), vocab_size).resize((cell, cell), Image.NEAREST)
        rows.append([picture, tokens_map])
    return grid(rows, ["image", f"tokens ({vocab_size} codes)"])
