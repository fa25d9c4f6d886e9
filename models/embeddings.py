"""Input embeddings: image patches (BEiT) and BERT-style text tokens (VLMo)."""
from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected by a strided convolution: `[B, C, H, W] -> [B, N, D]`."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} but the model was built for {self.img_size}x{self.img_size}; "
                f"resize the inputs or build the model with img_size={images.shape[-1]}")
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, N, D]


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings followed by LayerNorm (BERT, without token types,
    which the backbone adds only where modalities are mixed)."""

    def __init__(self, vocab_size: int, max_len: int, dim: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.register_buffer("position_ids", torch.arange(max_len), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_ids.numel():
            raise ValueError(f"text of {length} tokens exceeds the model's max_text_len {self.position_ids.numel()}")
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:length])  # [B, L, D]
        return self.norm(x)
