"""Convert BEiT weights (microsoft/unilm .pth, timm state dicts, Hugging Face model folders) into
this project's backbone checkpoint.

The result holds `backbone.*` (complete: entries the source lacks, such as the text embeddings,
are freshly initialised and reported), plus the heads the source had: `mim_head.*` from BEiT's
`lm_head` (so a converted pt22k checkpoint predicts the same visual tokens), `pooler_norm.*` and
`classifier.*` from fine-tuned checkpoints.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.checkpoint_io import is_safetensors, load_safetensors_file, load_torch_file
from common.errors import UserError
from conversion import beit_keymaps as km
from models import relative_position as rp
from models.backbone import VLMoBackbone
from models.config import BackboneConfig, check_vl_expert_start
from models.registry import BACKBONE_VARIANTS, find_variant

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class SourceWeights:
    """Canonically named source tensors and what is known about the source model."""

    tensors: dict[str, torch.Tensor]
    kind: str  # "huggingface" | "unilm/timm"
    hf_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConversionReport:
    mapped: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)  # specs of heads shapes cannot tell

    def lines(self) -> list[str]:
        out = [f"mapped {len(self.mapped)} source tensors"]
        for key, reason in self.dropped:
            out.append(f"dropped {key}: {reason}")
        if self.fresh:
            groups = sorted({_group(k) for k in self.fresh})
            out.append(f"initialised fresh (not in the source): {', '.join(groups)}")
        return out + self.notes


def _group(key: str) -> str:
    parts = key.split(".")
    return ".".join(p if not p.isdigit() else "*" for p in parts[:3])


# ---- reading -------------------------------------------------------------------------------------
def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if is_safetensors(path):
        return load_safetensors_file(path)[0]
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead")
    for key in ("model", "state_dict", "module"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path} contains no tensors; it is not a model checkpoint")
    return tensors


def _read_hf_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} is a folder without config.json; pass a Hugging Face model folder or a weight file")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_path} is not valid JSON ({err}); re-download or re-save the model") from None
    if config.get("model_type") not in (None, "beit"):
        raise UserError(f"{folder} holds a '{config.get('model_type')}' model, not BEiT; only BEiT weights can be converted")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(_read_tensor_file(folder / shard))
        return tensors, config
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return _read_tensor_file(folder / name), config
    raise UserError(f"{folder} has config.json but no {' or '.join(HF_WEIGHT_FILES)}; the download is incomplete")


def read_source(path: str | Path) -> SourceWeights:
    """Read a BEiT checkpoint in any supported format and rename it to canonical (unilm) keys."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; check --input")
    if path.is_dir():
        tensors, hf_config = _read_hf_folder(path)
    else:
        tensors, hf_config = _read_tensor_file(path), {}
    if any(re.match(r"(beit\.)?embeddings\.patch_embeddings\.", k) for k in tensors):
        renamed, unknown = {}, []
        for key, value in tensors.items():
            new = km.rename(key, km.HF_TO_CANONICAL)
            if new is None:
                unknown.append(key)
            else:
                renamed[new] = value
        kind = "huggingface"
    else:
        renamed = tensors
        unknown = [k for k in tensors if not km.matches_any(k, km.CANONICAL_KEYS)]
        kind = "unilm/timm"
    if unknown:
        raise UserError(f"{path} has {len(unknown)} weights that are not part of a BEiT encoder "
                        f"(e.g. {', '.join(sorted(unknown)[:4])}); it is another architecture (only BEiT "
                        f"unilm/timm/Hugging Face checkpoints convert)")
    if "patch_embed.proj.weight" not in renamed:
        raise UserError(f"{path} has no patch embedding; it is not a BEiT image encoder checkpoint")
    if "norm.weight" in renamed and kind == "huggingface" and any(k.startswith("beit.layernorm") for k in tensors) \
            and "layernorm.weight" in tensors:
        raise UserError(f"{path} applies two final LayerNorms (beit.layernorm and layernorm); this layout is not supported")
    return SourceWeights(renamed, kind, hf_config)


# ---- architecture ----------------------------------------------------------------------------------
def infer_config(src: SourceWeights, model: str | None) -> BackboneConfig:
    """The source architecture from tensor shapes (and config.json for HF folders)."""
    t = src.tensors
    embed_dim, in_chans, patch, _ = t["patch_embed.proj.weight"].shape
    depth = 1 + max((int(m.group(1)) for k in t if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise UserError("the source checkpoint has no transformer blocks")
    hidden = t["blocks.0.mlp.fc1.weight"].shape[0]
    shared_table = "rel_pos_bias.relative_position_bias_table" in t
    block_table = "blocks.0.attn.relative_position_bias_table" in t
    table = t.get("rel_pos_bias.relative_position_bias_table", t.get("blocks.0.attn.relative_position_bias_table"))
    num_heads = table.shape[1] if table is not None else src.hf_config.get("num_attention_heads")
    if num_heads is None and model is not None:
        num_heads = BackboneConfig(**BACKBONE_VARIANTS[model]).num_heads
    if num_heads is None:
        raise UserError("the source has no relative position tables to read the number of heads from; pass --model NAME")
    if table is not None:
        side = (math.isqrt(table.shape[0] - 3) + 1) // 2
        img_size = side * patch
    elif "pos_embed" in t:
        img_size = math.isqrt(t["pos_embed"].shape[1] - 1) * patch
    else:
        img_size = src.hf_config.get("image_size", 224)
    eps = src.hf_config.get("layer_norm_eps", 1e-6) if src.kind == "huggingface" else 1e-6
    return BackboneConfig(
        img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
        num_heads=int(num_heads), mlp_ratio=hidden / embed_dim, qkv_bias="blocks.0.attn.q_bias" in t,
        layer_scale_init_value=0.1 if "blocks.0.gamma_1" in t else 0.0,
        use_rel_pos_bias=shared_table or block_table, use_abs_pos_emb="pos_embed" in t,
        final_norm="norm.weight" in t, layer_norm_eps=eps)


def target_config(source: BackboneConfig, model: str | None, image_size: int | None, ffn: str,
                  vocab_size: int, max_text_len: int, vl_expert_start: int | None = None) -> BackboneConfig:
    """The config to convert into: `--model`'s sizes (checked against the source), the source's
    weight-determined switches, and the requested image size, FFN kind and text settings."""
    if model is not None:
        if model not in BACKBONE_VARIANTS:
            raise UserError(f"--model {model} is not a registered model; choose one of {', '.join(sorted(BACKBONE_VARIANTS))}")
        ref = BackboneConfig(**BACKBONE_VARIANTS[model])
        diffs = [f"{f}={getattr(source, f)} (--model {model} has {getattr(ref, f)})"
                 for f in ("embed_dim", "depth", "num_heads", "mlp_ratio") if getattr(source, f) != getattr(ref, f)]
        if diffs:
            hint = find_variant(source)
            raise UserError(f"the source checkpoint does not fit --model {model}: {', '.join(diffs)}; "
                            + (f"use --model {hint}" if hint else "omit --model to keep the source's architecture"))
        layer_scale = ref.layer_scale_init_value if source.layer_scale_init_value > 0 else 0.0
        vl_start = ref.vlffn_start_layer_index
    else:
        layer_scale = source.layer_scale_init_value
        hint = find_variant(source)
        vl_start = BackboneConfig(**BACKBONE_VARIANTS[hint]).vlffn_start_layer_index if hint else max(source.depth - 2, 0)
    values = source.to_dict()
    values.update(img_size=image_size or source.img_size, ffn=ffn, vocab_size=vocab_size, max_text_len=max_text_len,
                  layer_scale_init_value=layer_scale,
                  vlffn_start_layer_index=vl_start if vl_expert_start is None else vl_expert_start)
    try:
        target = BackboneConfig(**values)
    except ValueError as err:
        raise UserError(f"cannot convert to these settings: {err}; check --image_size") from None
    check_vl_expert_start(target, "--vlffn_start_layer_index")
    return target


# ---- conversion ------------------------------------------------------------------------------------
def _stack_rel_pos_tables(t: dict[str, torch.Tensor], src: BackboneConfig, dst: BackboneConfig,
                          fresh_table: torch.Tensor, report: ConversionReport) -> torch.Tensor:
    """One `[entries, depth*heads]` table: BEiT's image rows per layer (a shared table is repeated
    for every layer; a model with both kinds adds them, as BEiT's attention does), resized to the
    target grid; text and cross rows keep their fresh values (zeros)."""
    shared = t.get("rel_pos_bias.relative_position_bias_table")
    own = [t.get(f"blocks.{i}.attn.relative_position_bias_table") for i in range(src.depth)]
    if shared is not None:
        report.mapped.append(("rel_pos_bias.relative_position_bias_table", "backbone.relative_position_bias_table (every layer)"))
    report.mapped += [(f"blocks.{i}.attn.relative_position_bias_table", "backbone.relative_position_bias_table"
                       + (" (added to the shared table)" if shared is not None else "")) for i, table in enumerate(own)
                      if table is not None]
    if any(table is None for table in own) and any(table is not None for table in own):
        missing = [i for i, table in enumerate(own) if table is None]
        raise UserError(f"the source has relative position tables for some blocks but not for blocks {missing}; it is "
                        f"not a BEiT checkpoint this conversion knows")
    per_layer = [(shared if shared is not None else 0) + (table if table is not None else 0) for table in own]
    if shared is not None and own[0] is not None:
        report.notes.append("each block's relative position table added to the shared one (the source's attention "
                            "adds both)")
    image_rows = torch.cat(per_layer, 1)  # [R_src, depth*heads], column = layer*heads + head
    if src.grid_size != dst.grid_size:
        image_rows = rp.resize_image_table(image_rows, src.grid_size, dst.grid_size)
        report.notes.append(f"interpolated relative position bias {src.grid_size} -> {dst.grid_size} patches")
    table = fresh_table.clone()
    table[: image_rows.shape[0]] = image_rows
    return table


def _patch_aggregation(t: dict[str, torch.Tensor], src: BackboneConfig, dst: BackboneConfig, early_layers: int | None,
                       out: dict[str, torch.Tensor], report: ConversionReport) -> None:
    """BEiT v2's `cls_pt_layers` (already renamed into `out`): their relative position tables (each
    block's own plus the shared one, both of which BEiT v2 adds) stacked into the head's table, and
    the head's spec, whose early layer the file does not say (BEiT v2's recipes: depth − 3)."""
    layers = sorted({int(m.group(1)) for k in t if (m := re.match(r"cls_pt_layers\.(\d+)\.", k))})
    if not layers:
        return
    early = early_layers if early_layers is not None else src.depth - 3
    if not 1 <= early <= dst.depth:
        raise UserError(f"--early_layers {early}: the model has blocks 1..{dst.depth}")
    if dst.use_rel_pos_bias:
        shared = t.get("rel_pos_bias.relative_position_bias_table")
        tables = []
        for i in layers:
            own = t.get(f"cls_pt_layers.{i}.attn.relative_position_bias_table")
            tables.append(own + shared if own is not None and shared is not None else own if own is not None else shared)
        table = torch.cat(tables, 1)  # [R, head_layers*heads]
        if src.grid_size != dst.grid_size:
            table = rp.resize_image_table(table, src.grid_size, dst.grid_size)
        out["cls_pt_head.relative_position_bias_table"] = table
    shared_head = "cls_pt_lm_head.weight" not in t
    vocab_source = "lm_head.weight" if shared_head else "cls_pt_lm_head.weight"
    vocab = t[vocab_source].shape[0] if vocab_source in t else None
    report.heads["cls_pt_head"] = {"kind": "patch_aggregation", "backbone": dst.to_dict(), "early_layers": early,
                                   "head_layers": len(layers), "shared_lm_head": shared_head, "vocab_size": vocab}
    report.notes.append(f"BEiT v2's patch aggregation ({len(layers)} blocks after block {early}) kept as cls_pt_head: an "
                        f"image MIM stage with --early_layers {early} trains it, other stages carry it unused")


def convert(src: SourceWeights, src_cfg: BackboneConfig, dst_cfg: BackboneConfig,
            seed: int = 0, early_layers: int | None = None) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Canonical source tensors -> prefixed tensors of this project, plus a report. Entries the
    source lacks come from a model initialised with `seed`, so conversion is reproducible."""
    torch.manual_seed(seed)
    fresh = {f"backbone.{k}": v for k, v in VLMoBackbone(dst_cfg).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    report = ConversionReport()
    t = dict(src.tensors)
    # HF keeps q/k/v separate; BEiT fuses them into one projection.
    for i in range(src_cfg.depth):
        parts = [t.pop(f"blocks.{i}.attn.{p}.weight", None) for p in ("query", "key", "value")]
        if all(p is not None for p in parts):
            t[f"blocks.{i}.attn.qkv.weight"] = torch.cat(parts, 0)  # [3D, D]
    for key, value in t.items():
        reason = km.drop_reason(key)
        if reason:
            report.dropped.append((key, reason))
            continue
        if "relative_position_bias_table" in key:
            continue
        ffn = re.fullmatch(km.FFN_SOURCE, key)
        if ffn:
            layer, module, param = ffn.groups()
            for norm_name, mlp_name in km.FFN_EXPERTS[dst_cfg.ffn]:
                name = norm_name if module == "norm2" else module.replace("mlp", mlp_name, 1)
                target = f"backbone.blocks.{layer}.{name}.{param}"
                if target in fresh:  # the VL expert exists only from vlffn_start_layer_index on
                    out[target] = value
                    report.mapped.append((key, target))
            continue
        target = km.rename(key, km.CANONICAL_TO_OURS)
        if target is None:
            raise UserError(f"no rule maps source weight {key}; this checkpoint layout is not supported")
        out[target] = value
        report.mapped.append((key, target))
    if dst_cfg.use_rel_pos_bias:
        out["backbone.relative_position_bias_table"] = _stack_rel_pos_tables(
            t, src_cfg, dst_cfg, fresh["backbone.relative_position_bias_table"], report)
    _patch_aggregation(t, src_cfg, dst_cfg, early_layers, out, report)
    if "backbone.pos_embed" in out and src_cfg.grid_size != dst_cfg.grid_size:
        out["backbone.pos_embed"] = rp.resize_abs_pos_embed(out["backbone.pos_embed"], src_cfg.grid_size, dst_cfg.grid_size)
        report.notes.append(f"interpolated absolute position embedding {src_cfg.grid_size} -> {dst_cfg.grid_size} patches")
    for key, value in fresh.items():
        if key not in out:
            out[key] = value
            report.fresh.append(key)
    bad = [k for k, v in out.items() if k in fresh and v.shape != fresh[k].shape]
    if bad:
        raise UserError(f"converted weights do not fit the target model (e.g. {bad[0]} {tuple(out[bad[0]].shape)} vs "
                        f"{tuple(fresh[bad[0]].shape)}); check --model and --image_size")
    return out, report


@dataclass(frozen=True)
class BeitTarget:
    """What to convert into (util/convert_beit_ckpt.py's flags; the defaults keep the source's shape)."""

    model: str | None = None
    image_size: int | None = None
    ffn: str = "shared"
    vocab_size: int = 30522
    max_text_len: int = 196
    vl_expert_start: int | None = None
    seed: int = 0
    early_layers: int | None = None


def convert_file(source: str | Path, output: str | Path, target: BeitTarget = BeitTarget(), say=print) -> None:
    """Convert a BEiT checkpoint file or Hugging Face folder and write it (saying what was done)."""
    from common.checkpoint_io import save_weights
    from models.pretrained import UNTRAINED, describe, weight_groups

    src = read_source(source)
    src_cfg = infer_config(src, target.model)
    dst_cfg = target_config(src_cfg, target.model, target.image_size, target.ffn, target.vocab_size,
                            target.max_text_len, target.vl_expert_start)
    tensors, report = convert(src, src_cfg, dst_cfg, seed=target.seed, early_layers=target.early_layers)
    say(f"source: {source} ({src.kind}, {len(src.tensors)} tensors): {describe(src_cfg)}")
    say(f"target: {describe(dst_cfg)}")
    for line in report.lines():
        say("  " + line)
    untrained = sorted(weight_groups(report.fresh))  # e.g. the text path, which BEiT does not have
    info = {UNTRAINED: untrained, **({"heads": report.heads} if report.heads else {})}
    save_weights(output, tensors, dst_cfg.to_dict(), {"source": str(source)}, info)
    say(f"wrote {output}")
