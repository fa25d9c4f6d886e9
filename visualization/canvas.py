"""Turning tensors into labelled picture grids (PIL only, no plotting library), and writing them as
PNG files and TensorBoard images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from common.checkpoint_io import atomic_write

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def to_rgb(pixels: torch.Tensor, scale: int = 1) -> Image.Image:
    """`[C, H, W]` pixels in [0, 1] -> an RGB image (1 band as grey, more than 3: the first three),
    enlarged `scale` times with nearest neighbours so small patches stay sharp."""
    x = pixels.detach().float().cpu().clamp(0, 1)
    x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
    array = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array, "RGB")
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def grid(rows: list[list[Image.Image]], column_titles: list[str] | None = None, gap: int = 4,
         title_height: int = 22) -> Image.Image:
    """Cells of equal size in rows, with optional titles above the columns."""
    cell_w, cell_h = rows[0][0].size
    columns = max(len(r) for r in rows)
    top = title_height if column_titles else 0
    canvas = Image.new("RGB", (columns * (cell_w + gap) + gap, top + len(rows) * (cell_h + gap) + gap), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(column_titles or []):
        draw.text((gap + c * (cell_w + gap), 4), title, fill=INK, font=font(12))
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            canvas.paste(cell, (gap + c * (cell_w + gap), top + gap + r * (cell_h + gap)))
    return canvas


def save_picture(image: Image.Image, path: Path, writer=None, tag: str | None = None, step: int = 0) -> Path:
    """Write `image` as a PNG (atomically) and, when a TensorBoard writer is given, as an image there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    if writer is not None and tag:
        writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
    return path
