"""The plain ViT of BEiT v2's VQ-KD tokenizer (encoder and decoder), in the layout its released
files use (`beit2/modeling_finetune.py`'s VisionTransformer as `modeling_vqkd.py` configures it):
absolute position embeddings, a [CLS] token, q/v biases beside a bias-free qkv, no layer scale, and
mean-pooling's `fc_norm` (LayerNorm, eps 1e-6) applied to the patch tokens. Only what a tokenizer
needs: the normalised patch tokens."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 64  # every released VQ-KD ViT (768 wide, 12 heads); the width alone then gives the heads
# encoders util/train_vqkd.py builds: name -> (width, depth); base is BEiT v2's
VQKD_VARIANTS = {"vqkd_tiny": (192, 4), "vqkd_small": (384, 8), "vqkd_base": (768, 12)}


@dataclass(frozen=True)
class VitShape:
    image_size: int  # the grid of the position embeddings is image_size // patch_size
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "VitShape":
        """The shape a state dict's tensors imply (heads: width / 64, as every released file)."""
        proj = tensors[f"{prefix}patch_embed.proj.weight"]  # [D, C, p, p]
        dim, chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
        tokens = tensors[f"{prefix}pos_embed"].shape[1] - 1
        blocks = f"{prefix}blocks."
        depth = len({k[len(blocks):].split(".")[0] for k in tensors if k.startswith(blocks)})
        hidden = tensors[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0]
        return cls(int(math.isqrt(tokens)) * patch, patch, chans, dim, depth, max(1, dim // HEAD_DIM), hidden / dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])  # k has no bias
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)  # [B, H, N, N], as theirs computes it
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VqkdVit(nn.Module):
    def __init__(self, shape: VitShape) -> None:
        super().__init__()
        self.shape = shape
        d = shape.embed_dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(shape.in_chans, d, kernel_size=shape.patch_size, stride=shape.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, shape.grid ** 2 + 1, d))
        self.blocks = nn.ModuleList(Block(d, shape.num_heads, shape.mlp_ratio) for _ in range(shape.depth))
        self.fc_norm = nn.LayerNorm(d, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for i, block in enumerate(self.blocks):  # BEiT's depth rescaling of the residual branches
            block.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    def position_embedding(self, grid: int) -> torch.Tensor:
        """The [CLS] and patch position embeddings for a `grid` x `grid` input; another grid than
        the trained one is bicubically resized, as BEiT v2 does (with DINO's +0.1 on the scale)."""
        own = self.shape.grid
        if grid == own:
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = patches.shape[-1]
        scale = (grid + 0.1) / own
        resized = F.interpolate(patches.reshape(1, own, own, d).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                                mode="bicubic")  # [1, D, grid, grid]
        return torch.cat([cls, resized.permute(0, 2, 3, 1).reshape(1, grid * grid, d)], dim=1)

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, S, S]` -> `[B, (S/p)^2, D]` normalised patch tokens (the [CLS] token is dropped)."""
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]
        grid = int(math.isqrt(x.shape[1]))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embedding(grid)
        for block in self.blocks:
            x = block(x)
        return self.fc_norm(x[:, 1:])
