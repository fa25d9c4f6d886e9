"""Relative position bias shared by images, text and image-text pairs.

One table `[num_entries, depth * num_heads]` holds every layer's bias (VLMo's layout), so one gather
per forward serves all layers. Rows are laid out as:
  [0, R)                 image-image: (2Wh-1)(2Ww-1) window offsets, then cls->patch, patch->cls, cls->cls
  R, R+1                 text->image, image->text
  [R+2, R+2+2T)          text-text: 1-D offsets of positions 1.., then the three text-[CLS] entries
where R = (2Wh-1)(2Ww-1)+3 and T = max_text_len.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def num_image_entries(grid: tuple[int, int]) -> int:
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


def num_table_entries(grid: tuple[int, int], max_text_len: int) -> int:
    return num_image_entries(grid) + 2 * max_text_len + 2


def image_index(grid: tuple[int, int]) -> torch.Tensor:
    """BEiT's index `[1+N, 1+N]` into the image rows of the table."""
    gh, gw = grid
    coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")).flatten(1)  # [2, N]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [N, N, 2]
    rel[:, :, 0] += gh - 1
    rel[:, :, 1] += gw - 1
    n = gh * gw
    size = num_image_entries(grid)
    index = torch.empty(n + 1, n + 1, dtype=torch.long)
    index[1:, 1:] = rel[:, :, 0] * (2 * gw - 1) + rel[:, :, 1]
    index[0, :] = size - 3
    index[:, 0] = size - 2
    index[0, 0] = size - 1
    return index


def text_index(grid: tuple[int, int], max_text_len: int) -> torch.Tensor:
    """Index `[T, T]` into the text rows; position 0 is the text [CLS] token."""
    r = num_image_entries(grid)
    total = num_table_entries(grid, max_text_len)
    pos = torch.arange(max_text_len - 1)
    rel = pos[None, :] - pos[:, None]  # [T-1, T-1], offsets in [-(T-2), T-2]
    index = torch.empty(max_text_len, max_text_len, dtype=torch.long)
    index[1:, 1:] = rel + (max_text_len - 2) + r + 2
    index[0, :] = total - 3
    index[:, 0] = total - 2
    index[0, 0] = total - 1
    return index


def pair_index(image_idx: torch.Tensor, text_idx: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Index for a `[text; image]` sequence, text first as in VLMo."""
    r = num_image_entries(grid)
    lt, li = text_idx.shape[0], image_idx.shape[0]
    t2i = torch.full((lt, li), r, dtype=torch.long, device=text_idx.device)
    i2t = torch.full((li, lt), r + 1, dtype=torch.long, device=text_idx.device)
    return torch.cat([torch.cat([text_idx, t2i], 1), torch.cat([i2t, image_idx], 1)], 0)


def gather_bias(table: torch.Tensor, index: torch.Tensor, depth: int) -> torch.Tensor:
    """All layers' bias at once: `[depth, heads, n, n]`."""
    n = index.shape[0]
    bias = table[index.reshape(-1)].view(n, n, depth, -1)  # [n, n, L, H]
    return bias.permute(2, 3, 0, 1)


def resize_image_table(image_rows: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Interpolate the window part of image rows `[R_old, C]` to a new patch grid (bicubic,
    align_corners so it is the identity when the grid does not change); the 3 [CLS] rows are kept."""
    window, cls_rows = image_rows[:-3], image_rows[-3:]
    oh, ow = 2 * old_grid[0] - 1, 2 * old_grid[1] - 1
    nh, nw = 2 * new_grid[0] - 1, 2 * new_grid[1] - 1
    channels = window.shape[1]
    grid = window.t().reshape(1, channels, oh, ow).float()  # [1, C, oh, ow]
    grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=True)
    window = grid.reshape(channels, nh * nw).t().to(image_rows.dtype)
    return torch.cat([window, cls_rows], 0)


def resize_table(table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                 old_text_len: int, new_text_len: int) -> torch.Tensor:
    """Resize a full table for a new image grid and/or text capacity."""
    r = num_image_entries(old_grid)
    image_rows = resize_image_table(table[:r], old_grid, new_grid)
    cross = table[r:r + 2]
    text_rows = table[r + 2:]
    if new_text_len != old_text_len:
        offsets, cls_rows = text_rows[:-3], text_rows[-3:]
        # offset rows (2T-3 of them) are centred on T-2; keep the centre, pad with zeros or crop.
        old_c, new_c = old_text_len - 2, new_text_len - 2
        out = offsets.new_zeros(2 * new_text_len - 3, offsets.shape[1])
        span = min(old_c, new_c)
        out[new_c - span:new_c + span + 1] = offsets[old_c - span:old_c + span + 1]
        text_rows = torch.cat([out, cls_rows], 0)
    return torch.cat([image_rows, cross, text_rows], 0)


def resize_abs_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic interpolation of `[1, 1+N, D]` absolute image positions; the [CLS] position is kept."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = patch_pos.shape[-1]
    grid = patch_pos.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()  # [1, D, h, w]
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=True)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], 1)
