"""BEiT v2's patch aggregation (its `cls_pt_layers`): the top layer's [CLS] token, set beside an
early layer's patch tokens, goes through a few extra blocks whose outputs must also predict the
masked visual tokens. The early patch tokens know little, so the [CLS] token is pushed to carry the
image's content (what a linear probe reads). Only image MIM pretraining uses it; fine-tuning and
every other stage drop it. The blocks are the backbone's (an image-only FFN), with their own
relative position table when the backbone has one; with `shared_lm_head` the prediction reuses the
backbone's final norm and the MIM head, else this head's own (`cls_pt_norm`, `cls_pt_lm_head`)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from models import relative_position as rp
from models.config import BackboneConfig
from models.layers import Block, Modality


class PatchAggregationHead(nn.Module):
    kind = "patch_aggregation"

    def __init__(self, backbone: dict[str, Any], early_layers: int, head_layers: int = 2,
                 shared_lm_head: bool = True, vocab_size: int | None = None) -> None:
        super().__init__()
        cfg = BackboneConfig.from_dict(backbone)
        if not 1 <= early_layers <= cfg.depth:
            raise ValueError(f"early_layers {early_layers} must lie in 1..{cfg.depth}")
        self.backbone_config, self.early_layers, self.head_layers = cfg.to_dict(), early_layers, head_layers
        self.shared_lm_head, self.vocab_size = shared_lm_head, vocab_size
        blocks_cfg = dataclasses.replace(cfg, ffn="shared", depth=head_layers, drop_path_rate=0.0)
        self.cls_pt_layers = nn.ModuleList(Block(blocks_cfg, early_layers + i, 0.0) for i in range(head_layers))
        self.grid, self.heads = cfg.grid_size, cfg.num_heads
        if cfg.use_rel_pos_bias:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(rp.num_image_entries(cfg.grid_size), head_layers * cfg.num_heads))
            self.register_buffer("position_index", rp.image_index(cfg.grid_size), persistent=False)
        else:
            self.relative_position_bias_table = None
        if not shared_lm_head:
            if not vocab_size:
                raise ValueError("a patch aggregation head without the shared LM head needs vocab_size")
            self.cls_pt_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
            self.cls_pt_lm_head = nn.Linear(cfg.embed_dim, vocab_size)
        self._init_weights()

    def _init_weights(self) -> None:
        """As BEiT v2 starts them: truncated normal linears, and each block's output projections
        shrunk by its depth counted from the early layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for i, block in enumerate(self.cls_pt_layers):
            scale = 1.0 / math.sqrt(2.0 * (self.early_layers + i + 1))
            block.attn.proj.weight.data.mul_(scale)
            block.mlp.fc2.weight.data.mul_(scale)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "backbone": self.backbone_config, "early_layers": self.early_layers,
                "head_layers": self.head_layers, "shared_lm_head": self.shared_lm_head, "vocab_size": self.vocab_size}

    def forward(self, top: torch.Tensor, early: torch.Tensor) -> torch.Tensor:
        """`top`, `early`: `[B, 1+N, D]` outputs of the last and of the early block (before the
        final norm) -> `[B, 1+N, D]`: top's [CLS] with early's patches, through the extra blocks."""
        x = torch.cat([top[:, :1], early[:, 1:]], dim=1)
        bias = None
        if self.relative_position_bias_table is not None:
            bias = rp.gather_bias(self.relative_position_bias_table, self.position_index, self.head_layers)
        for i, block in enumerate(self.cls_pt_layers):
            x = block(x, None if bias is None else bias[i].unsqueeze(0), Modality.IMAGE)
        return x

    def predict(self, tokens: torch.Tensor, norm: nn.Module, mim_head: nn.Module) -> torch.Tensor:
        """Logits of `[M, D]` aggregated patch tokens (the shared norm and head, or this head's own)."""
        if self.shared_lm_head:
            return mim_head(norm(tokens))
        return self.cls_pt_lm_head(self.cls_pt_norm(tokens))
