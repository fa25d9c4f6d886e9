"""This project's weights -> BEiT as timm and Hugging Face hold it (the way out into the ecosystem).

The image path maps one to one: the shared relative-position table is split into per-block
tables (its image rows), multiway blocks export their image expert, and a mean-pooling classifier
becomes timm's `fc_norm` + `head` (`global_pool='avg'`) or HF's pooler layernorm + classifier."""
from __future__ import annotations

import re
from typing import Any

import torch

from common.errors import UserError
from conversion import beit_keymaps as km
from models import relative_position as rp
from models.config import BackboneConfig, layer_scale_enabled


def canonical_state(tensors: dict[str, torch.Tensor], cfg: BackboneConfig, mean_pool_classifier: bool) -> dict[str, torch.Tensor]:
    """Prefixed project tensors -> unilm/timm BEiT names (one relative-position table per block)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if any(re.fullmatch(p, key) for p, _ in km.NOT_EXPORTED):
            continue
        target = km.rename(key, km.OURS_TO_CANONICAL)
        if target is None:
            raise UserError(f"no export rule for weight {key}")
        out[target] = value
    if mean_pool_classifier:
        out.pop("norm.weight", None)  # BEiT's mean-pooling classifier normalises after pooling only
        out.pop("norm.bias", None)
    if cfg.use_rel_pos_bias:
        table = tensors["backbone.relative_position_bias_table"][: rp.num_image_entries(cfg.grid_size)]  # [E, L*H]
        for i in range(cfg.depth):
            out[f"blocks.{i}.attn.relative_position_bias_table"] = table[:, i * cfg.num_heads:(i + 1) * cfg.num_heads]
    return out


def split_qkv(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """HF keeps query/key/value projections apart."""
    state = dict(state)
    for i in range(depth):
        q, k, v = state.pop(f"blocks.{i}.attn.qkv.weight").chunk(3, 0)
        state.update({f"blocks.{i}.attn.query.weight": q, f"blocks.{i}.attn.key.weight": k,
                      f"blocks.{i}.attn.value.weight": v})
    return state


def timm_kwargs(cfg: BackboneConfig, num_classes: int, mean_pool: bool) -> dict[str, Any]:
    """Arguments of `timm.create_model("beit_base_patch16_224", pretrained=False, **kwargs)` for these weights."""
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
                depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                use_abs_pos_emb=cfg.use_abs_pos_emb, use_rel_pos_bias=cfg.use_rel_pos_bias, use_shared_rel_pos_bias=False,
                init_values=cfg.layer_scale_init_value if layer_scale_enabled(cfg) else None,
                num_classes=num_classes, global_pool="avg" if mean_pool else "token")


def to_timm(tensors: dict[str, torch.Tensor], cfg: BackboneConfig, num_classes: int, mean_pool: bool):
    """A timm Beit holding these weights (strictly loaded) and its state dict."""
    import timm

    if not cfg.use_rel_pos_bias and not cfg.use_abs_pos_emb:
        raise UserError("a model without position embeddings cannot be expressed as a timm Beit")
    state = canonical_state(tensors, cfg, mean_pool and num_classes > 0)
    state.pop("mask_token", None)
    state.pop("lm_head.weight", None)
    state.pop("lm_head.bias", None)
    if cfg.final_norm is False and not (mean_pool and num_classes > 0):
        raise UserError("this backbone has no final norm; timm's Beit always has one unless it mean-pools into fc_norm")
    model = timm.create_model("beit_base_patch16_224", pretrained=False, **timm_kwargs(cfg, num_classes, mean_pool))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "relative_position_index" not in k]
    if missing or unexpected:
        raise UserError(f"timm export does not line up: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval(), model.state_dict()


def hf_config(cfg: BackboneConfig, num_classes: int, mean_pool: bool, id2label: dict[int, str] | None = None):
    from transformers import BeitConfig

    extra = {"num_labels": num_classes, "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} \
        if num_classes and id2label else ({"num_labels": num_classes} if num_classes else {})
    return BeitConfig(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                      intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), image_size=cfg.img_size,
                      patch_size=cfg.patch_size, num_channels=cfg.in_chans, layer_norm_eps=cfg.layer_norm_eps,
                      use_absolute_position_embeddings=cfg.use_abs_pos_emb, use_relative_position_bias=cfg.use_rel_pos_bias,
                      use_shared_relative_position_bias=False, use_mean_pooling=mean_pool, use_mask_token=True,
                      layer_scale_init_value=cfg.layer_scale_init_value if layer_scale_enabled(cfg) else 0.0,
                      drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)


def to_hf(tensors: dict[str, torch.Tensor], cfg: BackboneConfig, num_classes: int, mean_pool: bool,
          id2label: dict[int, str] | None = None):
    """An HF `BeitForImageClassification` (with a classifier) or `BeitModel` holding these weights."""
    from transformers import BeitForImageClassification, BeitModel

    if num_classes == 0 and not cfg.final_norm:
        mean_pool = True  # no final norm: HF's BeitModel skips it only in its mean-pooling layout
    config = hf_config(cfg, num_classes, mean_pool, id2label)
    model = BeitForImageClassification(config) if num_classes else BeitModel(config, add_pooling_layer=False)
    if num_classes and not mean_pool:
        raise UserError("a [CLS] classifier (--use_cls) cannot be expressed as HF BeitForImageClassification, which "
                        "pools the CLS token through a pooler; export it to timm or ONNX")
    source = split_qkv(canonical_state(tensors, cfg, mean_pool and num_classes > 0), cfg.depth)
    own = model.state_dict()
    state, missing = {}, []
    for key, value in own.items():
        canonical = km.rename(key, km.HF_TO_CANONICAL)
        if canonical is not None and canonical in source:
            state[key] = source[canonical].reshape(value.shape)
        elif "relative_position_index" in key or key.endswith("attention.key.bias"):
            state[key] = value  # index buffers; BEiT's key projection has no bias
        else:
            missing.append(key)
    if missing:
        raise UserError(f"HF export has no source for {missing[:3]}")
    model.load_state_dict(state, strict=True)
    return model.eval()
