"""BEiT's semantic-segmentation head over the shared backbone's patch features: a feature pyramid
from four blocks (resized 4x, 2x, 1x and 0.5x, BEiT's fpn1-4), a UPerNet decoder (pyramid pooling
on the coarsest level, a top-down FPN, all levels fused) and an auxiliary FCN head on the third
level, used for its loss in training only (weight 0.4, as BEiT's ADE20K configs). Convolutions are
conv (no bias) + BatchNorm + ReLU, as mmseg's ConvModule."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

POOL_SCALES = (1, 2, 3, 6)
AUX_LEVEL = 2  # the 1x level (BEiT/mmseg: in_index=2)


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class FeaturePyramid(nn.Module):
    """Four `[B, D, h, w]` maps of one resolution -> 4x, 2x, 1x and 0.5x of it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, 2)

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        return [op(x) for op, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), levels)]


def bin_averages(length: int, bins: int, like: torch.Tensor) -> torch.Tensor:
    """`[bins, length]` weights that average each of adaptive pooling's bins (bin i spans
    floor(i L / n) .. ceil((i+1) L / n)), so pooling is a matrix product: exact, and exportable to
    ONNX for inputs of any size (the exporter cannot size adaptive pooling at dynamic shapes)."""
    weights = like.new_zeros(bins, length)
    for i in range(bins):
        start, end = (i * length) // bins, -((-(i + 1) * length) // bins)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def adaptive_average(x: torch.Tensor, bins: int) -> torch.Tensor:
    """`nn.functional.adaptive_avg_pool2d(x, bins)` as two matrix products: `[B, C, bins, bins]`."""
    rows, cols = bin_averages(int(x.shape[-2]), bins, x), bin_averages(int(x.shape[-1]), bins, x)
    return torch.einsum("ih,bchw,jw->bcij", rows, x, cols)


class PyramidPooling(nn.Module):
    """PSPNet's module: the map average-pooled to 1x1, 2x2, 3x3 and 6x6, projected, upsampled back
    and concatenated with the map itself, then fused by a 3x3 conv."""

    def __init__(self, in_ch: int, channels: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(conv_bn_relu(in_ch, channels, 1) for _ in POOL_SCALES)
        self.bottleneck = conv_bn_relu(in_ch + len(POOL_SCALES) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [resize(stage(adaptive_average(x, s)), x.shape[2:]) for s, stage in zip(POOL_SCALES, self.stages)]
        return self.bottleneck(torch.cat([x] + pooled, 1))


class UPerHead(nn.Module):
    """UPerNet: lateral 1x1 convs (pyramid pooling on the coarsest level), top-down additions,
    3x3 smoothing, every level upsampled to the finest and fused; logits at the finest level."""

    def __init__(self, in_ch: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.psp = PyramidPooling(in_ch, channels)
        self.lateral = nn.ModuleList(conv_bn_relu(in_ch, channels, 1) for _ in range(3))
        self.smooth = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fuse = conv_bn_relu(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classify = nn.Conv2d(channels, num_classes, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral, levels[:3])] + [self.psp(levels[3])]
        for i in range(3, 0, -1):  # coarse to fine
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.smooth, laterals[:3])] + [laterals[3]]
        finest = outs[0].shape[2:]
        fused = self.fuse(torch.cat([outs[0]] + [resize(x, finest) for x in outs[1:]], 1))
        return self.classify(self.dropout(fused))  # [B, classes, h0, w0]


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 conv and a classifier on one level."""

    def __init__(self, in_ch: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_ch, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classify = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.dropout(self.conv(x)))


class SegmentationHead(nn.Module):
    """Pyramid + UPerNet decoder + auxiliary FCN: one module, one name in checkpoints (`seg_head`),
    rebuilt from its spec."""

    kind = "segmentation"

    def __init__(self, embed_dim: int, num_classes: int, channels: int, aux_channels: int,
                 block_indices: tuple[int, ...] | list[int]) -> None:
        super().__init__()
        if len(block_indices) != 4:
            raise ValueError(f"the pyramid takes 4 blocks, got {list(block_indices)}")
        self.embed_dim, self.num_classes, self.channels, self.aux_channels = embed_dim, num_classes, channels, aux_channels
        self.block_indices = tuple(int(i) for i in block_indices)
        self.pyramid = FeaturePyramid(embed_dim)
        self.decode = UPerHead(embed_dim, channels, num_classes)
        self.aux = FCNHead(embed_dim, aux_channels, num_classes)
        for module in self.modules():  # mmcv's init: kaiming for ConvModules, N(0, 0.01) for the classifiers
            if isinstance(module, nn.Conv2d) and module in (self.decode.classify, self.aux.classify):
                nn.init.normal_(module.weight, std=0.01)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "embed_dim": self.embed_dim, "num_classes": self.num_classes,
                "channels": self.channels, "aux_channels": self.aux_channels, "block_indices": list(self.block_indices)}

    def forward(self, levels: list[torch.Tensor], with_aux: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Four `[B, D, h, w]` block outputs -> (logits at 4x h, w; auxiliary logits at 1x, or None
        when not asked for: only the training loss reads them)."""
        pyramid = self.pyramid(levels)
        return self.decode(pyramid), self.aux(pyramid[AUX_LEVEL]) if with_aux else None


def default_block_indices(depth: int) -> tuple[int, ...]:
    """BEiT's blocks 4, 6, 8 and 12 of 12 (0-based 3, 5, 7, 11), the same fractions of any depth."""
    return tuple(max(0, round(depth * k / 12) - 1) for k in (4, 6, 8, 12))
