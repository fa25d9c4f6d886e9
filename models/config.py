"""The backbone's configuration: a dataclass saved in every checkpoint so a checkpoint alone
rebuilds its model."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from common.errors import UserError

FFN_KINDS = ("shared", "multiway")


@dataclass
class BackboneConfig:
    """Architecture of the shared image/text transformer (BEiT image path, VLMo text and pair paths)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # BEiT style: learnable q and v biases, none on k
    layer_scale_init_value: float = 0.1  # 0 disables layer scale (gamma_1/gamma_2)
    use_rel_pos_bias: bool = True  # one table for image, text and pair positions, every layer
    use_abs_pos_emb: bool = False  # absolute image position embedding (VLMo base-plus)
    final_norm: bool = True  # False for checkpoints that only have a pooling norm (fc_norm)
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    # Text path (VLMo): BERT-style embeddings; max_text_len sizes position embeddings and the
    # text part of the relative-position table (VLMo's max_text_len_of_initckpt).
    vocab_size: int = 30522
    max_text_len: int = 196
    text_layer_norm_eps: float | None = None  # the text embeddings' norm (None: layer_norm_eps; BERT: 1e-12)
    # Feed-forward experts: "shared" (one FFN for every modality) or "multiway" (VLMo).
    ffn: str = "shared"
    vlffn_start_layer_index: int = 10

    def __post_init__(self) -> None:
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.img_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BackboneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown backbone config fields: {unknown}")
        return cls(**values)


# Fields that define the shape of the weights; a checkpoint must agree on all of them (image size
# and text length are handled by interpolation / slicing instead).
ARCHITECTURE_FIELDS = (
    "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
    "use_rel_pos_bias", "use_abs_pos_emb", "final_norm", "vocab_size", "ffn",
)
# Multiway-only shape field.
MULTIWAY_FIELDS = ("vlffn_start_layer_index",)


def check_vl_expert_start(cfg: BackboneConfig, flag: str) -> None:
    """A multiway model's vision-language expert starts at one of its blocks (at `depth`: none)."""
    if cfg.ffn == "multiway" and not 0 <= cfg.vlffn_start_layer_index <= cfg.depth:
        raise UserError(f"{flag} {cfg.vlffn_start_layer_index} is not a block of this {cfg.depth}-block model; choose "
                        f"0 to {cfg.depth} ({cfg.depth}: image-text pairs never reach a vision-language expert)")


def layer_scale_enabled(cfg: BackboneConfig) -> bool:
    return cfg.layer_scale_init_value > 0


