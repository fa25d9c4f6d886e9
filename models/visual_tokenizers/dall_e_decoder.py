"""OpenAI's DALL-E dVAE decoder (the `decoder.pkl` beside `encoder.pkl`), re-implemented with its
parameter names so its tensors load one to one. Only used to draw visual tokens back as pixels
(MIM reconstruction pictures); training never needs it."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from models.visual_tokenizers.dall_e import LOGIT_LAPLACE_EPS, Conv2d, ResidualBlock


@dataclass(frozen=True)
class DalleDecoderConfig:
    group_count: int = 4
    n_init: int = 128
    n_hid: int = 256
    n_blk_per_group: int = 2
    output_channels: int = 3
    vocab_size: int = 8192


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `map_pixels`, clamped to [0, 1]."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


class DalleDecoder(nn.Module):
    def __init__(self, cfg: DalleDecoderConfig = DalleDecoderConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        n_layers = cfg.group_count * cfg.n_blk_per_group
        widths = [2 ** (cfg.group_count - g) for g in range(1, cfg.group_count + 1)]  # x n_hid: 8, 4, 2, 1
        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(cfg.vocab_size, cfg.n_init, 1))]
        n_in = cfg.n_init
        for g, width in enumerate(widths, start=1):
            layers: list[tuple[str, nn.Module]] = []
            for i in range(cfg.n_blk_per_group):
                layers.append((f"block_{i + 1}", ResidualBlock(n_in, width * cfg.n_hid, n_layers, kernels=(1, 3, 3, 3))))
                n_in = width * cfg.n_hid
            if g < cfg.group_count:
                layers.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(layers))))
        groups.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv2d(cfg.n_hid, 2 * cfg.output_channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, vocab, h, w]` one-hot (or soft) tokens -> `[B, 2*C, 8h, 8w]` logit-Laplace statistics."""
        return self.blocks(x.float())

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, grid: int) -> torch.Tensor:
        """`[B, grid*grid]` token ids -> `[B, C, 8*grid, 8*grid]` pixels in [0, 1]. The 1x1 input
        convolution of a one-hot map is a column lookup, so the one-hot tensor is never built."""
        conv = self.blocks.input
        x = conv.w[:, :, 0, 0].t()[ids] + conv.b  # [B, grid*grid, n_init]
        x = x.transpose(1, 2).reshape(ids.shape[0], -1, grid, grid)
        for name, module in self.blocks.named_children():
            if name != "input":
                x = module(x)
        return unmap_pixels(torch.sigmoid(x[:, : self.cfg.output_channels].float()))
