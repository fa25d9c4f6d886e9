"""Text-to-image retrieval as a picture: a few held-out captions, each followed by the images the
model ranks highest for it, the caption's own image framed in green."""
from __future__ import annotations

import textwrap

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from custom_datasets import batch as B
from visualization.canvas import BACKGROUND, INK, font, grid, to_rgb

HIT, MISS = (30, 160, 60), (200, 200, 200)


def captions_and_images(dataset: Dataset, wanted: set[int], mean, std) -> tuple[list[str], dict[int, torch.Tensor]]:
    """Every caption in the order `pair_embeddings` embeds them, and the `[C, H, W]` pixels (in
    [0, 1], normalization undone) of the images in `wanted`, numbered as `pair_embeddings` numbers them."""
    captions, images, index = [], {}, 0
    mean, std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    for sample in dataset:
        if sample is None:  # unreadable samples are skipped there too
            continue
        caption = sample[B.CAPTION]
        captions += [caption] if isinstance(caption, str) else list(caption)
        if index in wanted:
            image = sample[B.IMAGE].float()
            images[index] = (image * std[: len(image)] + mean[: len(image)]).clamp(0, 1)
        index += 1
    return captions, images


def caption_cell(text: str, size: tuple[int, int], note: str) -> Image.Image:
    cell = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(cell)
    lines = textwrap.wrap(text, width=max(8, size[0] // 8))[: max(1, size[1] // 16 - 2)]
    draw.multiline_text((4, 4), "\n".join(lines), fill=INK, font=font(12), spacing=2)
    draw.text((4, size[1] - 18), note, fill=INK, font=font(11))
    return cell


def framed(image: Image.Image, colour: tuple[int, int, int], width: int = 4) -> Image.Image:
    out = image.copy()
    ImageDraw.Draw(out).rectangle([0, 0, out.width - 1, out.height - 1], outline=colour, width=width)
    return out


def top_images(similarity: torch.Tensor, queries: list[int], k: int) -> torch.Tensor:
    """`[Q, k]` image indices ranked for each query caption (`similarity` is [images, texts])."""
    return similarity.t()[queries].topk(min(k, similarity.shape[0]), dim=1).indices.cpu()


def retrieval_picture(similarity: torch.Tensor, owner: torch.Tensor, captions: list[str], images: dict[int, torch.Tensor],
                      queries: list[int], k: int = 5, cell: int = 112) -> Image.Image:
    """One row per query caption: the caption (with the rank of its own image), then its top-k images."""
    ranked = top_images(similarity, queries, k)
    order = similarity.t()[queries].argsort(dim=1, descending=True).cpu()
    rows = []
    for q, query in enumerate(queries):
        own = int(owner[query])
        rank = int((order[q] == own).nonzero()[0]) + 1
        row = [caption_cell(captions[query], (cell * 2, cell), f"its image: rank {rank} of {similarity.shape[0]}")]
        for index in ranked[q].tolist():
            thumb = to_rgb(images[index]).resize((cell, cell), Image.BILINEAR)
            row.append(framed(thumb, HIT if index == own else MISS))
        rows.append(row)
    # the caption cell is two cells wide: lay out rows side by side with the grid of their images
    pictures = grid([r[1:] for r in rows], [f"top {j + 1}" for j in range(k)])
    canvas = Image.new("RGB", (pictures.width + cell * 2 + 4, pictures.height), BACKGROUND)
    canvas.paste(pictures, (cell * 2 + 4, 0))
    for q, row in enumerate(rows):
        canvas.paste(row[0], (4, 22 + 4 + q * (cell + 4)))
    return canvas
