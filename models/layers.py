"""Transformer building blocks: BEiT attention (q/v bias, additive bias mask), feed-forward
experts (shared or VLMo multiway) and the pre-norm block with layer scale and drop path."""
from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn

from models.config import BackboneConfig, layer_scale_enabled


class Modality(enum.Enum):
    """Which expert a token sequence goes to (multiway FFN); shared FFN ignores it."""

    IMAGE = "image"
    TEXT = "text"
    PAIR = "pair"  # [text; image] concatenated, text first


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample during training."""

    def __init__(self, prob: float) -> None:
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


class Attention(nn.Module):
    """Multi-head self-attention. `qkv` and `proj` are always *called* as modules so LoRA
    wrappers see every use; BEiT's q/v biases are added after the bias-free qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x)  # [B, N, 3C]
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
            qkv = qkv + bias.to(qkv.dtype)
        qkv = qkv.view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
        q, k, v = qkv.unbind(0)
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, N, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block. Shared FFN: `norm2`/`mlp` (BEiT names). Multiway FFN:
    `norm2_imag`/`mlp_imag`, `norm2_text`/`mlp_text` and, from `vlffn_start_layer_index` on,
    `norm2_vl`/`mlp_vl` (VLMo names), so both kinds of checkpoint map one to one."""

    def __init__(self, cfg: BackboneConfig, layer_index: int, drop_path: float) -> None:
        super().__init__()
        dim, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.multiway = cfg.ffn == "multiway"
        if self.multiway:
            self.norm2_imag, self.mlp_imag = nn.LayerNorm(dim, eps=cfg.layer_norm_eps), Mlp(dim, hidden)
            self.norm2_text, self.mlp_text = nn.LayerNorm(dim, eps=cfg.layer_norm_eps), Mlp(dim, hidden)
            self.has_vl_expert = layer_index >= cfg.vlffn_start_layer_index
            if self.has_vl_expert:
                self.norm2_vl, self.mlp_vl = nn.LayerNorm(dim, eps=cfg.layer_norm_eps), Mlp(dim, hidden)
        else:
            self.norm2, self.mlp = nn.LayerNorm(dim, eps=cfg.layer_norm_eps), Mlp(dim, hidden)
        if layer_scale_enabled(cfg):
            self.gamma_1 = nn.Parameter(torch.full((dim,), cfg.layer_scale_init_value))
            self.gamma_2 = nn.Parameter(torch.full((dim,), cfg.layer_scale_init_value))
        else:
            self.gamma_1 = self.gamma_2 = None

    def _ffn(self, x: torch.Tensor, modality: Modality, text_len: int) -> torch.Tensor:
        if not self.multiway:
            return self.mlp(self.norm2(x))
        if modality is Modality.IMAGE:
            return self.mlp_imag(self.norm2_imag(x))
        if modality is Modality.TEXT:
            return self.mlp_text(self.norm2_text(x))
        if self.has_vl_expert:
            return self.mlp_vl(self.norm2_vl(x))
        text, image = x[:, :text_len], x[:, text_len:]
        return torch.cat([self.mlp_text(self.norm2_text(text)), self.mlp_imag(self.norm2_imag(image))], 1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, modality: Modality, text_len: int = 0) -> torch.Tensor:
        y = self.attn(self.norm1(x), attn_mask)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self._ffn(x, modality, text_len)
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)
