"""Loading converted checkpoints into a backbone: architecture checks, resolution and text-length
adaptation, and strict key matching with a clear report."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from common.checkpoint_io import Checkpoint
from common.errors import UserError
from models import relative_position as rp
from models.checkpoints import read_model_checkpoint
from models.config import ARCHITECTURE_FIELDS, MULTIWAY_FIELDS, BackboneConfig, layer_scale_enabled
from models.registry import find_variant

log = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone."


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def architecture_mismatches(saved: BackboneConfig, wanted: BackboneConfig) -> list[str]:
    """Human-readable differences that make the weights incompatible."""
    diffs = [f"{f}={getattr(saved, f)} (model wants {getattr(wanted, f)})"
             for f in ARCHITECTURE_FIELDS if getattr(saved, f) != getattr(wanted, f)]
    if layer_scale_enabled(saved) != layer_scale_enabled(wanted):
        diffs.append(f"layer scale {'on' if layer_scale_enabled(saved) else 'off'} "
                     f"(model wants {'on' if layer_scale_enabled(wanted) else 'off'})")
    if saved.ffn == wanted.ffn == "multiway":
        diffs += [f"{f}={getattr(saved, f)} (model wants {getattr(wanted, f)})"
                  for f in MULTIWAY_FIELDS if getattr(saved, f) != getattr(wanted, f)]
    return diffs


def adapt_backbone_state(state: dict[str, torch.Tensor], saved: BackboneConfig, wanted: BackboneConfig,
                         fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Resize position tables from the saved image size / text capacity to the wanted ones.
    `fresh` (a newly initialised model's state) supplies rows for text positions beyond the saved capacity."""
    state = dict(state)
    if saved.use_rel_pos_bias and (saved.grid_size != wanted.grid_size or saved.max_text_len != wanted.max_text_len):
        key = "relative_position_bias_table"
        state[key] = rp.resize_table(state[key], saved.grid_size, wanted.grid_size, saved.max_text_len, wanted.max_text_len)
        log.info("resized relative position table %s -> %s", saved.grid_size, wanted.grid_size)
    if saved.use_abs_pos_emb and saved.grid_size != wanted.grid_size:
        state["pos_embed"] = rp.resize_abs_pos_embed(state["pos_embed"], saved.grid_size, wanted.grid_size)
    if saved.max_text_len != wanted.max_text_len:
        key = "text_embeddings.position_embeddings.weight"
        old = state[key]
        new = fresh[key].clone()
        keep = min(old.shape[0], new.shape[0])
        new[:keep] = old[:keep]
        state[key] = new
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict` that reports missing/unexpected/mis-shaped keys in one sentence."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} with another shape (e.g. {', '.join(shapes[:2])})")
        raise UserError(f"{source} does not match the model: {'; '.join(parts)}; "
                        f"use the checkpoint that belongs to this model or re-convert it")
    module.load_state_dict(state, strict=True)


def config_from_checkpoint(ckpt: Checkpoint) -> BackboneConfig:
    if ckpt.backbone_config is None:
        raise UserError(f"{ckpt.path} is not a checkpoint of this project (it has no backbone config); convert it "
                        f"first: python util/convert_beit_ckpt.py --input {ckpt.path} --output checkpoints/converted.safetensors")
    try:
        return BackboneConfig.from_dict(ckpt.backbone_config)
    except (TypeError, ValueError) as err:
        raise UserError(f"{ckpt.path} has an unreadable backbone config ({err}); re-convert it") from None


def load_backbone_weights(model: nn.Module, path: str, ckpt: Checkpoint | None = None) -> Checkpoint:
    """Load a converted / merged / run checkpoint into `model` (a VLMoBackbone), adapting image size
    and text capacity; any other difference is an error naming the checkpoint and the fix."""
    ckpt = ckpt or read_model_checkpoint(path)
    saved = config_from_checkpoint(ckpt)
    wanted: BackboneConfig = model.cfg
    diffs = architecture_mismatches(saved, wanted)
    if diffs:
        raise UserError(f"{path} was saved for another architecture: {', '.join(diffs)}; "
                        f"build the model from the checkpoint's own config (name=None) or pass a matching checkpoint")
    from models.lora_checkpoints import fold_adapters

    tensors, folded = fold_adapters(ckpt)
    if folded:
        log.warning("%s: merged its LoRA adapters into the base weights", path)
    state = split_prefix(tensors, BACKBONE_PREFIX)
    if not state:
        raise UserError(f"{path} holds no backbone weights (no '{BACKBONE_PREFIX}*' keys)")
    state = adapt_backbone_state(state, saved, wanted, model.state_dict())
    load_strict(model, state, str(path))
    return ckpt


def config_for_pretrained(path: str, overrides: dict[str, Any],
                          ckpt: Checkpoint | None = None) -> tuple[BackboneConfig, Checkpoint]:
    """The saved config with runtime overrides (image size, text capacity, drop path)."""
    ckpt = ckpt or read_model_checkpoint(path)
    saved = config_from_checkpoint(ckpt)
    values = saved.to_dict()
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return BackboneConfig(**values), ckpt
    except (TypeError, ValueError) as err:
        raise UserError(f"cannot build a model from {path} with these settings: {err}") from None


# What makes a variant a variant; patch size and channels come from the checkpoint unless overridden.
SIZE_FIELDS = ("embed_dim", "depth", "num_heads", "mlp_ratio")


def check_variant_fits(saved: BackboneConfig, name: str, wanted: BackboneConfig, path: str) -> None:
    """A named model and a checkpoint must agree on every size."""
    diffs = [f"{f}={getattr(saved, f)} ({name} has {getattr(wanted, f)})"
             for f in SIZE_FIELDS if getattr(saved, f) != getattr(wanted, f)]
    if diffs:
        hint = find_variant(saved)
        fix = f"use --model {hint}" if hint and hint != name else "use the model the checkpoint was made for"
        raise UserError(f"{path} is a checkpoint of another size: {', '.join(diffs)}; {fix}")


UNTRAINED = "untrained"  # run_info: groups of weights no run has trained (e.g. a converted BEiT's text path)
TEXT_EMBEDDINGS = "backbone.text_embeddings"


def weight_groups(names) -> set[str]:
    """`backbone.blocks.3.attn.qkv.weight` -> `backbone.blocks`: the granularity untrained parts are
    recorded at."""
    return {".".join(n.split(".")[:2]) if n.startswith(BACKBONE_PREFIX) else n.split(".")[0] for n in names}


def _vocab_advice(ckpt: Checkpoint, vocab_size: int) -> str:
    if ckpt.extra.get("origin") or "source" in (ckpt.extra.get("metadata") or {}):
        return f"re-convert the weights with --vocab_size {vocab_size}"
    record = ckpt.info.get("text_tokenizer") or {}
    used = record.get("name") or (ckpt.extra.get("args") or {}).get("tokenizer")
    return f"use the tokenizer that checkpoint was trained with{f' (--tokenizer {used})' if used else ''}"


def fit_text_vocabulary(ckpt: Checkpoint, vocab_size: int | None, tokenizer: str | None) -> tuple[Checkpoint, str | None]:
    """(`ckpt` whose text embeddings fit the tokenizer, a note when they had to be re-created).
    Text embeddings no run has trained (recorded in the checkpoint) are re-created at the tokenizer's
    size; trained ones that do not fit are refused."""
    saved = (ckpt.backbone_config or {}).get("vocab_size")
    if vocab_size is None or saved in (None, vocab_size):
        return ckpt, None
    if TEXT_EMBEDDINGS not in ckpt.info.get(UNTRAINED, []):
        raise UserError(f"{ckpt.path} has a trained {saved}-token text vocabulary but --tokenizer {tokenizer} has "
                        f"{vocab_size}; {_vocab_advice(ckpt, vocab_size)}")
    key = f"{TEXT_EMBEDDINGS}.word_embeddings.weight"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        words = torch.empty(vocab_size, ckpt.model[key].shape[1], dtype=ckpt.model[key].dtype)
        nn.init.trunc_normal_(words, std=0.02)
    tensors = {k: v for k, v in ckpt.model.items() if not k.startswith("mlm_head.")}  # a head over the old vocabulary
    tensors[key] = words
    config = {**ckpt.backbone_config, "vocab_size": vocab_size}
    note = (f"{ckpt.path}: its text embeddings were never trained, so they are created for the {vocab_size} tokens of "
            f"--tokenizer {tokenizer} (the file had {saved})")
    return Checkpoint(ckpt.path, tensors, config, ckpt.extra, ckpt.info), note


def describe(cfg: BackboneConfig) -> str:
    """One line for logs."""
    return (f"{cfg.embed_dim}d x {cfg.depth} layers, {cfg.num_heads} heads, {cfg.img_size}px / patch {cfg.patch_size}, "
            f"ffn={cfg.ffn}, rel_pos={cfg.use_rel_pos_bias}, abs_pos={cfg.use_abs_pos_emb}")
