"""OpenAI's DALL-E dVAE encoder, re-implemented with the same architecture and parameter names
(`blocks.input.w`, `blocks.group_1.block_1.res_path.conv_1.w`, ...) so `encoder.pkl` tensors load
one to one. 8x downsampling, 8192 tokens, inputs through `map_pixels`."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the range the dVAE was trained on."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


@dataclass(frozen=True)
class DalleEncoderConfig:
    group_count: int = 4
    n_hid: int = 256
    n_blk_per_group: int = 2
    input_channels: int = 3
    vocab_size: int = 8192


class Conv2d(nn.Module):
    """'Same'-padded convolution with DALL-E's parameter names `w` and `b`."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw))
        self.b = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.w, std=(n_in * kw**2) ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w.to(x.dtype), self.b.to(x.dtype), padding=(self.w.shape[-1] - 1) // 2)


class ResidualBlock(nn.Module):
    """DALL-E's residual block: identity (or 1x1) path plus a gained 4-conv path; the encoder's
    convolutions are 3-3-3-1 wide, the decoder's 1-3-3-3."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int] = (3, 3, 3, 1)) -> None:
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [(n_in, hid), (hid, hid), (hid, hid), (hid, n_out)]
        layers: list[tuple[str, nn.Module]] = []
        for i, ((a, b), kw) in enumerate(zip(widths, kernels), start=1):
            layers += [(f"relu_{i}", nn.ReLU()), (f"conv_{i}", Conv2d(a, b, kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    def __init__(self, cfg: DalleEncoderConfig = DalleEncoderConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        n_layers = cfg.group_count * cfg.n_blk_per_group
        widths = [1, 1, 2, 4, 8]  # group g maps widths[g-1] -> widths[g] (x n_hid)
        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(cfg.input_channels, cfg.n_hid, 7))]
        for g in range(1, cfg.group_count + 1):
            layers: list[tuple[str, nn.Module]] = []
            for i in range(cfg.n_blk_per_group):
                n_in = widths[g - 1] if i == 0 else widths[g]
                layers.append((f"block_{i + 1}", ResidualBlock(n_in * cfg.n_hid, widths[g] * cfg.n_hid, n_layers)))
            if g < cfg.group_count:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(layers))))
        groups.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv2d(widths[-1] * cfg.n_hid, cfg.vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` mapped pixels -> logits `[B, vocab, H/8, W/8]`."""
        return self.blocks(x)
