"""The VQ-KD autoencoder trained by util/train_vqkd.py, as BEiT v2 trains it: the tokenizer
(encoder ViT, task layer, codebook) quantises each patch to its nearest code, a small ViT decoder
(patch size 1 over the grid of codes) and its task layer map the codes to the teacher's feature
space, and the loss is the cosine distance to the teacher's patch features plus the commitment
term ||sg(e) − z||² (β = 1, gradients pass the codes straight through). Only the tokenizer part is
written out; the decoder serves training alone."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.visual_tokenizers.vqkd import VqkdTokenizer, task_layer
from models.visual_tokenizers.vqkd_vit import VitShape, VqkdVit


@dataclass(frozen=True)
class VqkdShape:
    encoder: VitShape
    codebook_size: int
    codebook_dim: int
    decoder_depth: int
    teacher_dim: int

    def decoder(self) -> VitShape:
        e = self.encoder
        return VitShape(e.grid, 1, self.codebook_dim, e.embed_dim, self.decoder_depth, e.num_heads, e.mlp_ratio)


def cosine_distance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 − cos (BEiT v2's 'cosine' reconstruction loss)."""
    return (1 - F.cosine_similarity(prediction.float(), target.float(), dim=-1)).mean()


class VqkdAutoencoder(nn.Module):
    def __init__(self, shape: VqkdShape, info: dict | None = None) -> None:
        super().__init__()
        self.shape = shape
        self.tokenizer = VqkdTokenizer(shape.encoder, shape.codebook_size, shape.codebook_dim, info)
        self.decoder = VqkdVit(shape.decoder())
        self.decode_task_layer = task_layer(shape.encoder.embed_dim, shape.teacher_dim)
        for layer in (self.tokenizer.encode_task_layer, self.decode_task_layer):
            for m in layer:
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(`[B, N, d]` task-layer vectors, `[B, N]` code ids) of `[B, 3, S, S]` pixels in [0, 1]."""
        z = self.tokenizer.code_vectors(images)
        with torch.no_grad():
            ids = self.tokenizer.quantize.nearest(z.detach().reshape(-1, z.shape[-1])).reshape(z.shape[:2])
        return z, ids

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """`target`: the teacher's `[B, N, D]` patch features on the same images."""
        z, ids = self.encode(images)
        z = F.normalize(z, dim=-1)
        codes = self.tokenizer.quantize.embedding.weight[ids]  # [B, N, d]
        quant_loss = F.mse_loss(codes.detach(), z)
        z_q = z + (codes - z).detach()  # straight through
        b, n, d = z_q.shape
        grid = math.isqrt(n)
        decoded = self.decoder.patch_tokens(z_q.transpose(1, 2).reshape(b, d, grid, grid).contiguous())
        rec_loss = cosine_distance(self.decode_task_layer(decoded), target)
        return {"loss": rec_loss + quant_loss, "rec_loss": rec_loss.detach(), "quant_loss": quant_loss.detach(),
                "ids": ids, "z": z.detach()}
