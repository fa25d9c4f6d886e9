"""Task heads that checkpoints carry next to the backbone."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


class MLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then logits over the text vocabulary."""

    def __init__(self, embed_dim: int, vocab_size: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.decoder = nn.Linear(embed_dim, vocab_size)
        for layer in (self.dense, self.decoder):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(features))))


class ITCHead(nn.Module):
    """VLMo's contrastive projections of the image and text [CLS] features, and a learnable
    temperature (CLIP's init 1/0.07, logit scale capped at 100)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.image_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        for layer in (self.image_proj, self.text_proj):
            nn.init.trunc_normal_(layer.weight, std=0.02)

    def embed_image(self, cls_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(cls_features).float(), dim=-1)

    def embed_text(self, cls_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(cls_features).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)
