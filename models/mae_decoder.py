"""MAE's light decoder (He et al., 2021) as a head: the encoder's tokens of the visible patches,
a mask token in every masked patch's place, fixed 2-D sine-cosine positions, a few ViT blocks, and
a linear prediction of each patch's pixels. Its keys are MAE's own (`decoder_embed`,
`decoder_blocks.i.attn.qkv`, ...), so MAE's released decoders load one to one."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """`[M]` positions -> `[M, dim]`: sines then cosines of positions at frequencies 1/10000^(i/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.double()[:, None] * omega[None]  # [M, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed positions `[1, (1 +) h*w, dim]`: the first half encodes a patch's column, the second
    its row (their meshgrid(w, h) order), a zero vector for [CLS]."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float()[None]


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, N, p*p*C]`, each patch's pixels row by row, channels last (MAE's order)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """The inverse of `patchify`: `[B, N, p*p*C]` -> `[B, C, H, W]`."""
    b = patches.shape[0]
    x = patches.reshape(b, grid[0], grid[1], patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, grid[0] * patch, grid[1] * patch)


def pixel_targets(images: torch.Tensor, patch: int, norm_pix: bool) -> torch.Tensor:
    """What MAE predicts: each patch's pixels, with `norm_pix` normalised by the patch's own mean and
    variance (unbiased, + 1e-6, as MAE's loss)."""
    target = patchify(images.float(), patch)  # [B, N, p*p*C]
    if not norm_pix:
        return target
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    return (target - mean) / (var + 1e-6) ** 0.5


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch, averaged over the masked patches only (MAE's loss)."""
    per_patch = (prediction.float() - target).pow(2).mean(-1)  # [B, N]
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()


class DecoderBlock(nn.Module):
    """A pre-norm ViT block as MAE's decoder has it (timm's Block: qkv with biases, no layer scale)."""

    def __init__(self, dim: int, heads: int, eps: float, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class MAEDecoder(nn.Module):
    """`forward(latent [B, 1+K, D], visible [B, K])` -> pixel predictions `[B, N, p*p*C]` of every
    patch (the loss reads the masked ones). `mask_ratio` and `norm_pix_loss` are how the head was
    trained: the stage report measures it the same way."""

    kind = "mae_decoder"

    def __init__(self, embed_dim: int, decoder_embed_dim: int, depth: int, num_heads: int, patch_size: int,
                 grid: tuple[int, int] | list[int], in_chans: int = 3, eps: float = 1e-6, mlp_ratio: float = 4.0,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True) -> None:
        super().__init__()
        self.embed_dim, self.decoder_embed_dim, self.depth, self.num_heads = embed_dim, decoder_embed_dim, depth, num_heads
        self.patch_size, self.grid, self.in_chans, self.eps = patch_size, tuple(grid), in_chans, eps
        self.mlp_ratio, self.mask_ratio, self.norm_pix_loss = mlp_ratio, mask_ratio, norm_pix_loss
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        # fixed, as MAE's and Hugging Face's (neither trains it): made from the grid, not saved, so the
        # decoder follows the run's image size
        self.register_buffer("decoder_pos_embed", sincos_2d(decoder_embed_dim, self.grid), persistent=False)
        self.decoder_blocks = nn.ModuleList(DecoderBlock(decoder_embed_dim, num_heads, eps, mlp_ratio)
                                            for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=eps)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:  # MAE's: xavier-uniform linears, normal(0.02) mask token
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "embed_dim": self.embed_dim, "decoder_embed_dim": self.decoder_embed_dim,
                "depth": self.depth, "num_heads": self.num_heads, "patch_size": self.patch_size, "grid": list(self.grid),
                "in_chans": self.in_chans, "eps": self.eps, "mlp_ratio": self.mlp_ratio, "mask_ratio": self.mask_ratio,
                "norm_pix_loss": self.norm_pix_loss}

    def forward(self, latent: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)  # [B, 1+K, Dd]
        b, _, d = x.shape
        n = self.grid[0] * self.grid[1]
        tokens = self.mask_token.to(x.dtype).expand(b, n, d).clone()  # [B, N, Dd]
        tokens.scatter_(1, visible[..., None].expand(-1, -1, d), x[:, 1:])  # the visible ones in their places
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed.to(x.dtype)  # [B, 1+N, Dd]
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # [B, N, p*p*C]
