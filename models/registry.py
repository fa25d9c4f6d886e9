"""Named backbone variants. `create_model` in `models/__init__.py` builds them."""
from __future__ import annotations

from typing import Any

from models.config import BackboneConfig

BACKBONE_VARIANTS: dict[str, dict[str, Any]] = {
    # Laptop/test size: trains in minutes on a CPU.
    "vlmo_tiny_patch16": dict(embed_dim=192, depth=4, num_heads=3, layer_scale_init_value=0.1, vlffn_start_layer_index=3),
    "vlmo_small_patch16": dict(embed_dim=384, depth=12, num_heads=6, layer_scale_init_value=0.1),
    # BEiT-base: 768/12/12, q/v bias, layer scale 0.1, relative position bias.
    "vlmo_base_patch16": dict(embed_dim=768, depth=12, num_heads=12, layer_scale_init_value=0.1),
    # BEiT-large: 1024/24/16, layer scale 1e-5.
    "vlmo_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16, layer_scale_init_value=1e-5,
                               vlffn_start_layer_index=21),
    # VLMo base-plus: 544/24/16, absolute positions, no relative position bias.
    "vlmo_base_plus_patch16": dict(embed_dim=544, depth=24, num_heads=16, layer_scale_init_value=0.1,
                                   use_abs_pos_emb=True, use_rel_pos_bias=False, vlffn_start_layer_index=21),
}


def list_models() -> list[str]:
    return sorted(BACKBONE_VARIANTS)


def variant_config(name: str, **overrides: Any) -> BackboneConfig:
    """The config of a registered variant with field overrides (e.g. img_size, patch_size)."""
    if name not in BACKBONE_VARIANTS:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    values = {**BACKBONE_VARIANTS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return BackboneConfig(**values)


def find_variant(cfg: BackboneConfig) -> str | None:
    """The registered variant whose width, depth and heads match `cfg`, if any."""
    for name, values in BACKBONE_VARIANTS.items():
        ref = BackboneConfig(**values)
        if (ref.embed_dim, ref.depth, ref.num_heads) == (cfg.embed_dim, cfg.depth, cfg.num_heads):
            return name
    return None
