"""Declarative key tables for BEiT weights.

Two steps: every source format is renamed to one canonical naming (the microsoft/unilm BEiT names,
which timm also uses), then canonical names are mapped to this project's. Each row is
`(source regex, target template)`; a key must match exactly one row of its table or it is an error.
Structural work that is not renaming (fusing HF's q/k/v, stacking relative-position tables,
copying the FFN into multiway experts) is done by `util/beit_conversion.py` on canonical names.
"""
from __future__ import annotations

import re

# Hugging Face transformers BEiT (BeitModel / BeitForMaskedImageModeling / BeitForImageClassification).
# The optional `beit.` prefix covers the task models; both the 4.x names (also what 5.x writes with
# save_pretrained) and the 5.x in-memory names are listed.
_B = r"(?:beit\.)?"
HF_TO_CANONICAL: tuple[tuple[str, str], ...] = (
    (_B + r"embeddings\.cls_token", r"cls_token"),
    (_B + r"embeddings\.mask_token", r"mask_token"),
    (_B + r"embeddings\.position_embeddings", r"pos_embed"),
    (_B + r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    # 4.x names
    (_B + r"encoder\.relative_position_bias\.relative_position_bias_table", r"rel_pos_bias.relative_position_bias_table"),
    (_B + r"encoder\.relative_position_bias\.relative_position_index", r"rel_pos_bias.relative_position_index"),
    (_B + r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.weight", r"blocks.\1.attn.\2.weight"),
    (_B + r"encoder\.layer\.(\d+)\.attention\.attention\.query\.bias", r"blocks.\1.attn.q_bias"),
    (_B + r"encoder\.layer\.(\d+)\.attention\.attention\.value\.bias", r"blocks.\1.attn.v_bias"),
    (_B + r"encoder\.layer\.(\d+)\.attention\.attention\.relative_position_bias\.(relative_position_\w+)", r"blocks.\1.attn.\2"),
    (_B + r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_B + r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_B + r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_B + r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_B + r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (_B + r"encoder\.layer\.(\d+)\.lambda_(1|2)", r"blocks.\1.gamma_\2"),
    # 5.x names
    (_B + r"shared_position_bias\.(relative_position_\w+)", r"rel_pos_bias.\1"),
    (_B + r"layers\.(\d+)\.attention\.q_proj\.weight", r"blocks.\1.attn.query.weight"),
    (_B + r"layers\.(\d+)\.attention\.k_proj\.weight", r"blocks.\1.attn.key.weight"),
    (_B + r"layers\.(\d+)\.attention\.v_proj\.weight", r"blocks.\1.attn.value.weight"),
    (_B + r"layers\.(\d+)\.attention\.q_proj\.bias", r"blocks.\1.attn.q_bias"),
    (_B + r"layers\.(\d+)\.attention\.v_proj\.bias", r"blocks.\1.attn.v_bias"),
    (_B + r"layers\.(\d+)\.attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_B + r"layers\.(\d+)\.relative_position_bias\.(relative_position_\w+)", r"blocks.\1.attn.\2"),
    (_B + r"layers\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_B + r"layers\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_B + r"layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (_B + r"layers\.(\d+)\.lambda_(1|2)", r"blocks.\1.gamma_\2"),
    # heads and norms (BeitModel's own `layernorm`, or the MIM model's top-level one)
    (_B + r"layernorm\.(weight|bias)", r"norm.\1"),
    (_B + r"pooler\.layernorm\.(weight|bias)", r"fc_norm.\1"),
    (r"lm_head\.(weight|bias)", r"lm_head.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
)

# microsoft/unilm and timm Beit already use the canonical names.
CANONICAL_KEYS: tuple[str, ...] = (
    r"cls_token", r"mask_token", r"pos_embed", r"patch_embed\.proj\.(weight|bias)",
    r"rel_pos_bias\.relative_position_(bias_table|index)",
    r"blocks\.\d+\.attn\.relative_position_(bias_table|index)",
    r"blocks\.\d+\.attn\.(q_bias|v_bias|qkv\.weight|proj\.weight|proj\.bias)",
    r"blocks\.\d+\.attn\.(query|key|value)\.weight",
    r"blocks\.\d+\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"blocks\.\d+\.gamma_(1|2)",
    r"norm\.(weight|bias)", r"fc_norm\.(weight|bias)", r"lm_head\.(weight|bias)", r"head\.(weight|bias)",
    # BEiT v2's patch aggregation (pretraining checkpoints): blocks after an early layer, own norm / LM head
    r"cls_pt_layers\.\d+\.attn\.relative_position_(bias_table|index)",
    r"cls_pt_layers\.\d+\.attn\.(q_bias|v_bias|qkv\.weight|proj\.weight|proj\.bias)",
    r"cls_pt_layers\.\d+\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"cls_pt_layers\.\d+\.gamma_(1|2)",
    r"cls_pt_(norm|lm_head)\.(weight|bias)",
)

# Canonical -> ours. FFN keys (norm2, mlp) go through FFN_EXPERTS; tables are stacked separately.
CANONICAL_TO_OURS: tuple[tuple[str, str], ...] = (
    (r"(cls_token|mask_token|pos_embed)", r"backbone.\1"),
    (r"patch_embed\.proj\.(weight|bias)", r"backbone.patch_embed.proj.\1"),
    (r"blocks\.(\d+)\.(norm1\.weight|norm1\.bias|gamma_1|gamma_2)", r"backbone.blocks.\1.\2"),
    (r"blocks\.(\d+)\.attn\.(q_bias|v_bias|qkv\.weight|proj\.weight|proj\.bias)", r"backbone.blocks.\1.attn.\2"),
    (r"norm\.(weight|bias)", r"backbone.norm.\1"),
    (r"lm_head\.(weight|bias)", r"mim_head.proj.\1"),
    (r"fc_norm\.(weight|bias)", r"pooler_norm.\1"),
    (r"head\.(weight|bias)", r"classifier.\1"),
    (r"cls_pt_layers\.(\d+)\.(.+)", r"cls_pt_head.cls_pt_layers.\1.\2"),  # its blocks' FFN is BEiT's (shared)
    (r"cls_pt_(norm|lm_head)\.(weight|bias)", r"cls_pt_head.cls_pt_\1.\2"),
)

# The BEiT FFN (norm2 + mlp) feeds every expert of a multiway block.
FFN_SOURCE = r"blocks\.(\d+)\.(norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
FFN_EXPERTS: dict[str, tuple[tuple[str, str], ...]] = {
    "shared": (("norm2", "mlp"),),
    "multiway": (("norm2_imag", "mlp_imag"), ("norm2_text", "mlp_text"), ("norm2_vl", "mlp_vl")),
}

# Keys read but not copied, and why.
DROPPED: tuple[tuple[str, str], ...] = (
    (r".*relative_position_index", "an index buffer recomputed from the image grid"),
)


def rename(key: str, table: tuple[tuple[str, str], ...]) -> str | None:
    """Apply the one row of `table` that matches `key` entirely; None when no row does."""
    for pattern, target in table:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(target)
    return None


def matches_any(key: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(p, key) for p in patterns)


def drop_reason(key: str) -> str | None:
    for pattern, reason in DROPPED:
        if re.fullmatch(pattern, key):
            return reason
    return None


# ---- export: ours -> canonical (timm names; HF names come from HF_TO_CANONICAL in reverse) ----------
# Multiway checkpoints export their image expert; the relative-position table is split per block by
# util/beit_export.py.
OURS_TO_CANONICAL: tuple[tuple[str, str], ...] = (
    (r"backbone\.(cls_token|mask_token|pos_embed)", r"\1"),
    (r"backbone\.patch_embed\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"backbone\.blocks\.(\d+)\.(norm1\.weight|norm1\.bias|gamma_1|gamma_2)", r"blocks.\1.\2"),
    (r"backbone\.blocks\.(\d+)\.attn\.(q_bias|v_bias|qkv\.weight|proj\.weight|proj\.bias)", r"blocks.\1.attn.\2"),
    (r"backbone\.blocks\.(\d+)\.norm2(?:_imag)?\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"backbone\.blocks\.(\d+)\.mlp(?:_imag)?\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"backbone\.norm\.(weight|bias)", r"norm.\1"),
    (r"pooler_norm\.(weight|bias)", r"fc_norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
    (r"mim_head\.proj\.(weight|bias)", r"lm_head.\1"),
)

# What an image-only BEiT cannot hold, and why.
NOT_EXPORTED: tuple[tuple[str, str], ...] = (
    (r"backbone\.(text_embeddings|token_type_embeddings)\..*", "the text path (BEiT has none)"),
    (r"backbone\.blocks\.\d+\.(norm2|mlp)_(text|vl)\..*", "text / image-text experts (BEiT has none)"),
    (r"(mlm_head|itc_head)\..*", "heads of text stages"),
    (r"backbone\.relative_position_bias_table", "split into per-block tables"),
)
