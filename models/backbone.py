"""The shared VLMo/BEiT transformer: one set of blocks for images, text and image-text pairs."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models import relative_position as rp
from models.config import BackboneConfig
from models.embeddings import PatchEmbed, TextEmbeddings
from models.layers import Block, Modality

# Layer ids for timm's layer-wise lr decay of any model holding the backbone as `backbone`:
# embeddings first, then one group per block, the final norm last.
BACKBONE_LAYER_GROUPS = {
    "stem": r"^backbone\.(?:cls_token|mask_token|pos_embed|patch_embed|relative_position_bias_table|"
            r"text_embeddings|token_type_embeddings)",
    "blocks": [(r"^backbone\.blocks\.(\d+)", None), (r"^backbone\.norm", (99999,))],
}


class HoldsBackbone:
    """For a model holding the backbone as `self.backbone` (classifiers, segmenter, fusion heads,
    pretraining modes): what timm's layer-decay grouping asks of it."""

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> dict:
        return BACKBONE_LAYER_GROUPS


class VLMoBackbone(nn.Module):
    """BEiT image path + VLMo text/pair paths over one stack of blocks.

    Every `encode_*` returns final-normed token features (`norm` is Identity for checkpoints that
    only carry a pooling norm)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, dim)) if cfg.use_abs_pos_emb else None
        text_eps = cfg.layer_norm_eps if cfg.text_layer_norm_eps is None else cfg.text_layer_norm_eps
        self.text_embeddings = TextEmbeddings(cfg.vocab_size, cfg.max_text_len, dim, text_eps)
        self.token_type_embeddings = nn.Embedding(2, dim)  # 0 text, 1 image; used in pairs only
        if cfg.use_rel_pos_bias:
            entries = rp.num_table_entries(cfg.grid_size, cfg.max_text_len)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(entries, cfg.depth * cfg.num_heads))
            self.register_buffer("image_position_index", rp.image_index(cfg.grid_size), persistent=False)
            self.register_buffer("text_position_index", rp.text_index(cfg.grid_size, cfg.max_text_len), persistent=False)
        else:
            self.relative_position_bias_table = None
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(cfg, i, rates[i]) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps) if cfg.final_norm else nn.Identity()
        self.grad_checkpointing = False
        self._init_weights()

    # ---- init -------------------------------------------------------------------------------
    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        # BEiT: shrink each residual branch's output projection with depth.
        for i, block in enumerate(self.blocks):
            scale = 1.0 / math.sqrt(2.0 * (i + 1))
            block.attn.proj.weight.data.mul_(scale)
            for name in ("mlp", "mlp_imag", "mlp_text", "mlp_vl"):
                if hasattr(block, name):
                    getattr(block, name).fc2.weight.data.mul_(scale)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in backward to trade compute for memory."""
        self.grad_checkpointing = enabled

    def no_weight_decay(self) -> set[str]:
        """Parameter names that should not be weight-decayed (tokens, positions, tables)."""
        names = {"cls_token", "mask_token", "pos_embed", "relative_position_bias_table"}
        return {n for n, _ in self.named_parameters() if n.split(".")[-1] in names or n.endswith("position_embeddings.weight")}

    # ---- embeddings ---------------------------------------------------------------------------
    def _embed_image(self, images: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> torch.Tensor:
        x = self.patch_embed(images)  # [B, N, D]
        if bool_masked_pos is not None:
            w = bool_masked_pos.flatten(1).unsqueeze(-1).type_as(x)  # [B, N, 1]
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], 1)  # [B, 1+N, D]
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    def _bias(self, index: torch.Tensor | None) -> torch.Tensor | None:
        if self.relative_position_bias_table is None or index is None:
            return None
        return rp.gather_bias(self.relative_position_bias_table, index, self.cfg.depth)  # [L, H, n, n]

    @staticmethod
    def _padding_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`[B, n]` keep-mask -> additive `[B, 1, 1, n]` mask (-inf on padded keys)."""
        mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
        return mask.masked_fill(~keep.bool(), float("-inf"))[:, None, None, :]

    # ---- the shared stack ---------------------------------------------------------------------
    def _run_blocks(self, x: torch.Tensor, bias: torch.Tensor | None, padding: torch.Tensor | None,
                    modality: Modality, text_len: int = 0, apply_norm: bool = True,
                    collect: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """`collect`: block indices to keep the (un-normed) outputs of, filled in place; blocks after
        the last one asked for are skipped."""
        blocks = self.blocks if collect is None else self.blocks[:max(collect) + 1]
        for i, block in enumerate(blocks):
            # [1, H, n, n] shared by the batch, or [B, H, n, n] per sample (each its own visible patches)
            mask = None if bias is None else (bias[i] if bias.ndim == 5 else bias[i].unsqueeze(0))
            if padding is not None:
                mask = padding if mask is None else mask + padding  # [B, H, n, n]
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, mask, modality, text_len, use_reentrant=False)
            else:
                x = block(x, mask, modality, text_len)
            if collect is not None and i in collect:
                collect[i] = x
        return self.norm(x) if apply_norm else x

    # ---- public API ---------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, bool_masked_pos: torch.Tensor | None = None,
                     apply_norm: bool = True) -> torch.Tensor:
        """`[B, C, H, W]` (+ optional `[B, N]` mask of patches to replace by the mask token) -> `[B, 1+N, D]`.
        `apply_norm=False` skips the final norm (BEiT's mean-pooling classifier normalises after pooling)."""
        x = self._embed_image(images, bool_masked_pos)
        index = getattr(self, "image_position_index", None)
        return self._run_blocks(x, self._bias(index), None, Modality.IMAGE, apply_norm=apply_norm)

    def encode_visible(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """MAE's encoder: only the `visible` patches (`[B, K]` indices, the same count per image) and
        [CLS] go through the blocks, each with its own position (absolute embedding and/or the
        relative bias between the visible positions alone) -> `[B, 1+K, D]`, final-normed."""
        x = self._embed_image(images, None)  # [B, 1+N, D], positions added
        keep = torch.cat([visible.new_zeros(visible.shape[0], 1), visible + 1], dim=1)  # [B, 1+K] incl. [CLS]
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # [B, 1+K, D]
        index = getattr(self, "image_position_index", None)
        bias = None
        if self.relative_position_bias_table is not None and index is not None:
            rows = index[keep[:, :, None], keep[:, None, :]]  # [B, 1+K, 1+K]
            b, n = rows.shape[:2]
            bias = self.relative_position_bias_table[rows.reshape(-1)].view(b, n, n, self.cfg.depth, -1)
            bias = bias.permute(3, 0, 4, 1, 2)  # [L, B, H, n, n]
        return self._run_blocks(x, bias, None, Modality.IMAGE)

    def image_block_outputs(self, images: torch.Tensor, indices: tuple[int, ...],
                            bool_masked_pos: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The `[B, 1+N, D]` outputs of the given blocks (0-based, before the final norm), the
        multi-level features dense prediction reads (BEiT segmentation: blocks 3, 5, 7, 11 of 12)
        and BEiT v2's patch aggregation (an early block and the last, of masked images)."""
        if not indices or min(indices) < 0 or max(indices) >= len(self.blocks):
            raise ValueError(f"block indices {indices} must lie in 0..{len(self.blocks) - 1}")
        x = self._embed_image(images, bool_masked_pos)
        collect: dict[int, torch.Tensor] = dict.fromkeys(indices)
        index = getattr(self, "image_position_index", None)
        self._run_blocks(x, self._bias(index), None, Modality.IMAGE, apply_norm=False, collect=collect)
        return [collect[i] for i in indices]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, L]` token ids (+ `[B, L]` 1/0 mask, 0 = padding) -> `[B, L, D]`."""
        x = self.text_embeddings(input_ids)
        length = input_ids.shape[1]
        index = getattr(self, "text_position_index", None)
        bias = self._bias(None if index is None else index[:length, :length])
        padding = None if attention_mask is None else self._padding_mask(attention_mask, x.dtype)
        return self._run_blocks(x, bias, padding, Modality.TEXT)

    def encode_pair(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Image and text in one sequence, text first: -> `[B, L+1+N, D]`."""
        text = self.text_embeddings(input_ids) + self.token_type_embeddings.weight[0]  # [B, L, D]
        image = self._embed_image(images, bool_masked_pos) + self.token_type_embeddings.weight[1]  # [B, 1+N, D]
        x = torch.cat([text, image.to(text.dtype)], 1)  # [B, L+1+N, D]
        length = input_ids.shape[1]
        bias = None
        if self.relative_position_bias_table is not None:
            index = rp.pair_index(self.image_position_index, self.text_position_index[:length, :length], self.cfg.grid_size)
            bias = self._bias(index)
        padding = None
        if attention_mask is not None:
            keep = torch.cat([attention_mask.bool(), attention_mask.new_ones(image.shape[:2]).bool()], 1)
            padding = self._padding_mask(keep, x.dtype)
        return self._run_blocks(x, bias, padding, Modality.PAIR, text_len=length)
