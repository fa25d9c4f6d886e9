"""Per-iteration learning rate: linear warmup, then half-cycle cosine to `min_lr` (MAE)."""
from __future__ import annotations

import math

import torch


def lr_at(epoch_float: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    if epoch_float < warmup_epochs:
        return lr * epoch_float / warmup_epochs
    progress = (epoch_float - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_scale", 1.0)
