"""Task heads that checkpoints carry next to the backbone."""
from __future__ import annotations

import torch
from torch import nn


class MIMHead(nn.Module):
    """BEiT's `lm_head`: token features -> logits over the visual vocabulary."""

    def __init__(self, embed_dim: int, vocab_size: int = 8192) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, vocab_size)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)
