"""ContinualTransformer checkpoints (github.com/YifanXu74/ContinualTransformer) read as this
project's, with the same outputs: its converted BEiT init (`*_transfertovlmo.pth`), its run
checkpoints (`{'model', 'optimizer', 'epoch', 'scaler', 'args'}`), LoRA runs and released merged
models. Learned from its layout only (no code of it here).

Their model differs from ours in ways the mapping absorbs, exactly:
- token-type embeddings are added in single-modality passes too: type 0 after the text embedding
  norm (folded into that norm's bias), type 1 to every image token (folded into the [CLS] token,
  the mask token and the patch projection bias); our pair path then adds zeros;
- text embeddings are BERT's with relative positions only: word + BERT's own token type 0 (a
  constant, folded into our position rows), then LayerNorm with eps 1e-12 (`text_layer_norm_eps`);
- the relative position table has our layout already (image rows, 2 cross rows, text rows);
- MIM head with a transform (Linear, GELU, LayerNorm) and a separate bias; BERT's MLM head (eps
  1e-12); ITC projections with an uncapped `logit_scale`; a pooler;
- LoRA factors are `lora_A`/`lora_B` parameters (no `.weight`) with scaling 1/rank (alpha 1);
- run checkpoints carry the tokenizer their model holds (`mim_processor.d_vae`, BEiT's `Dalle_VAE`):
  OpenAI's DALL-E encoder and decoder, kept to serve as the run's tokenizer and its pictures' renderer
  (a `customized` d_vae is reported and left out);
- their `convert_pretrained_weight` prefixes every BEiT key it does not recognise with `transformer.`:
  a pt22k checkpoint's shared table becomes `transformer.rel_pos_bias.relative_position_bias_table`
  (here: every layer's image rows, which BEiT computes) and its MIM head `transformer.lm_head.*`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from common.checkpoint_io import Checkpoint
from common.errors import UserError
from models.config import BackboneConfig

SIGNATURE = "transformer.patch_embed.proj.weight"
TOKENIZER_PREFIX = "mim_processor.d_vae."
DALL_E_PARTS = ("encoder", "decoder")
SHARED_TABLE = "transformer.rel_pos_bias.relative_position_bias_table"
ORIGIN = "ContinualTransformer"

KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"transformer\.(patch_embed\.proj\.(?:weight|bias)|cls_token|pos_embed|norm\.(?:weight|bias))", r"backbone.\1"),
    (r"transformer\.blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"backbone.blocks.\1.\2.\3"),
    (r"transformer\.blocks\.(\d+)\.attn\.(q_bias|v_bias)", r"backbone.blocks.\1.attn.\2"),
    (r"transformer\.blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"backbone.blocks.\1.\2.\3"),
    (r"transformer\.blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.lora_(A|B)", r"backbone.blocks.\1.\2.lora_\3.weight"),
    (r"transformer\.blocks\.(\d+)\.gamma_(1|2)", r"backbone.blocks.\1.gamma_\2"),
    (r"mask_token", r"backbone.mask_token"),
    (r"relative_position_bias_table", r"backbone.relative_position_bias_table"),
    (r"text_embeddings\.word_embeddings\.weight", r"backbone.text_embeddings.word_embeddings.weight"),
    (r"text_embeddings\.LayerNorm\.(weight|bias)", r"backbone.text_embeddings.norm.\1"),
    (r"mim_score\.transform\.(0|2)\.(weight|bias)", r"mim_head.transform.\1.\2"),
    (r"mim_score\.decoder\.weight", r"mim_head.proj.weight"),
    (r"mim_score\.bias", r"mim_head.proj.bias"),
    (r"mlm_score\.transform\.dense\.(weight|bias)", r"mlm_head.dense.\1"),
    (r"mlm_score\.transform\.LayerNorm\.(weight|bias)", r"mlm_head.norm.\1"),
    (r"mlm_score\.decoder\.weight", r"mlm_head.decoder.weight"),
    (r"mlm_score\.bias", r"mlm_head.decoder.bias"),
    (r"pooler\.dense\.(weight|bias)", r"pooler.dense.\1"),
    (r"(?:\w+\.)?fc_img\.weight", r"itc_head.image_proj.weight"),
    (r"(?:\w+\.)?fc_txt\.weight", r"itc_head.text_proj.weight"),
    (r"(?:\w+\.)?logit_scale", r"itc_head.logit_scale"),
    (r"transformer\.lm_head\.(weight|bias)", r"mim_head.proj.\1"),  # BEiT's MIM head, prefixed by their converter
)
# read, then folded into other weights by `fold_token_types` / `text_positions`
FOLDED = ("token_type_embeddings.weight", "text_embeddings.token_type_embeddings.weight",
          "text_embeddings.position_embeddings.weight")
DROPPED: tuple[tuple[str, str], ...] = (
    (r".*relative_position_index|.*position_ids|.*token_type_ids", "index buffers, recomputed"),
    (r"transformer\.(fc_norm|head)\.(weight|bias)", "BEiT's ImageNet classifier, which ContinualTransformer never uses"),
    (r"transformer\.mask_token", "BEiT's mask token, which ContinualTransformer leaves unused (it has its own)"),
)


def is_continual_transformer(ckpt: Checkpoint) -> bool:
    return ckpt.backbone_config is None and SIGNATURE in ckpt.model


def _rename(key: str) -> str | None:
    for pattern, target in KEY_MAP:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(target)
    return None


def _drop_reason(key: str) -> str | None:
    return next((reason for pattern, reason in DROPPED if re.fullmatch(pattern, key)), None)


def infer_config(t: dict[str, torch.Tensor], args: dict[str, Any], path: str) -> BackboneConfig:
    """The architecture from tensor shapes (the run's flags, when saved, for what shapes leave open)."""
    dim, chans, patch, _ = t[SIGNATURE].shape
    depth = 1 + max(int(m.group(1)) for k in t if (m := re.match(r"transformer\.blocks\.(\d+)\.", k)))
    table = t.get("relative_position_bias_table")
    shared = t.get(SHARED_TABLE)
    text_len = int(args.get("max_text_len_of_initckpt", 196))
    if table is None and shared is not None:  # a pt22k checkpoint through their converter: BEiT's one table
        heads, side = shared.shape[1], (math.isqrt(shared.shape[0] - 3) + 1) // 2
        if (2 * side - 1) ** 2 + 3 != shared.shape[0]:
            raise UserError(f"{path}: its {SHARED_TABLE} has {shared.shape[0]} rows, which fits no image size")
        img_size = side * patch
    elif table is not None:
        heads = table.shape[1] // depth
        side = (math.isqrt(table.shape[0] - 2 * text_len - 2 - 3) + 1) // 2
        if (2 * side - 1) ** 2 + 3 + 2 * text_len + 2 != table.shape[0]:
            raise UserError(f"{path}: its relative position table has {table.shape[0]} rows, which fits no image size "
                            f"with {text_len} text positions; it is not a ContinualTransformer checkpoint")
        img_size = side * patch
    else:
        heads, img_size = int(args.get("num_heads", dim // 64)), int(args.get("image_size", 224))
        if "transformer.pos_embed" in t:
            img_size = math.isqrt(t["transformer.pos_embed"].shape[1] - 1) * patch
    words = t.get("text_embeddings.word_embeddings.weight")
    return BackboneConfig(
        img_size=img_size, patch_size=patch, in_chans=chans, embed_dim=dim, depth=depth, num_heads=heads,
        mlp_ratio=t["transformer.blocks.0.mlp.fc1.weight"].shape[0] / dim,
        qkv_bias="transformer.blocks.0.attn.q_bias" in t,
        layer_scale_init_value=0.1 if "transformer.blocks.0.gamma_1" in t else 0.0,
        use_rel_pos_bias=table is not None or shared is not None, use_abs_pos_emb="transformer.pos_embed" in t,
        final_norm=True,
        vocab_size=words.shape[0] if words is not None else int(args.get("vocab_size", 30522)),
        max_text_len=text_len, text_layer_norm_eps=1e-12, ffn="shared")


@dataclass
class Translation:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    folded: dict[str, torch.Tensor] = field(default_factory=dict)
    # the DALL-E parts a run's model holds: {"encoder": {...}, "decoder": {...}}
    dall_e: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def tokenizer_part(key: str) -> tuple[str, str] | None:
    """(DALL-E part, its own key) of a key of the tokenizer a run's model holds; ("", key) for a
    tokenizer that is not OpenAI's DALL-E (their `customized` DiscreteVAE); None for other keys."""
    if not key.startswith(TOKENIZER_PREFIX):
        return None
    part, _, rest = key[len(TOKENIZER_PREFIX):].partition(".")
    return (part, rest) if part in DALL_E_PARTS and rest.startswith("blocks.") else ("", key)


def rename_all(t: dict[str, torch.Tensor], path: str) -> Translation:
    out, unknown, other_tokenizer = Translation(), [], 0
    for key, value in t.items():
        if (found := tokenizer_part(key)) is not None:
            part, rest = found
            if part:
                out.dall_e.setdefault(part, {})[rest] = value
            else:
                other_tokenizer += 1
        elif key == SHARED_TABLE:
            out.folded[key] = value
        elif key in FOLDED:
            out.folded[key] = value
        elif (reason := _drop_reason(key)) is not None:
            out.dropped.append(f"{key} ({reason})")
        elif (target := _rename(key)) is not None:
            out.tensors[target] = value
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"{path} looks like a ContinualTransformer checkpoint but has {len(unknown)} weights no rule maps "
                        f"(e.g. {', '.join(sorted(unknown)[:4])}); please report the layout")
    if other_tokenizer:
        out.dropped.append(f"{other_tokenizer} weights of its customized discrete VAE (mim_processor.d_vae; this project "
                           f"runs OpenAI's DALL-E and k-means tokenizers)")
    if out.dall_e and "encoder" not in out.dall_e:
        out.dropped.append("the DALL-E decoder it carries without its encoder")
        out.dall_e = {}
    return out


def shared_table(tr: Translation, cfg: BackboneConfig) -> None:
    """BEiT's shared relative position table (pt22k) as the image rows of every layer, which is what
    BEiT computes; the text rows stay fresh (zeros, as ContinualTransformer initialises them)."""
    table = tr.folded.get(SHARED_TABLE)
    if table is None:
        return
    from models import relative_position as rp

    fresh = torch.zeros(rp.num_table_entries(cfg.grid_size, cfg.max_text_len), cfg.depth * cfg.num_heads)
    fresh[: table.shape[0]] = table.repeat(1, cfg.depth)  # column layer*heads + head = the shared head
    tr.tensors["backbone.relative_position_bias_table"] = fresh
    tr.notes.append("BEiT's shared relative position table (transformer.rel_pos_bias) given to every layer")


def text_positions(tr: Translation, cfg: BackboneConfig) -> None:
    """Our position rows = BERT's constant token type 0 (+ its absolute positions, used only by a
    model without relative positions)."""
    bert_types = tr.folded.get("text_embeddings.token_type_embeddings.weight")
    if bert_types is None or "backbone.text_embeddings.word_embeddings.weight" not in tr.tensors:
        return
    rows = bert_types[0].expand(cfg.max_text_len, -1).clone()  # [T, D]
    absolute = tr.folded.get("text_embeddings.position_embeddings.weight")
    if not cfg.use_rel_pos_bias and absolute is not None:
        n = min(len(absolute), cfg.max_text_len)
        rows[:n] += absolute[:n]
    tr.tensors["backbone.text_embeddings.position_embeddings.weight"] = rows


def fold_token_types(tr: Translation, dim: int) -> None:
    """Type 0 into the text norm's bias, type 1 into every image token; our pair path adds zeros."""
    types = tr.folded.get("token_type_embeddings.weight")
    if types is None:
        return
    t = tr.tensors
    if "backbone.text_embeddings.norm.bias" in t:
        t["backbone.text_embeddings.norm.bias"] = t["backbone.text_embeddings.norm.bias"] + types[0]
    for key in ("backbone.cls_token", "backbone.mask_token", "backbone.patch_embed.proj.bias"):
        if key in t:
            t[key] = t[key] + types[1]  # [.., D] broadcast
    t["backbone.token_type_embeddings.weight"] = torch.zeros(2, dim, dtype=types.dtype)
    tr.notes.append("folded the token-type embeddings into the text norm bias and the image tokens")


def head_specs(tensors: dict[str, torch.Tensor], dim: int) -> dict[str, dict[str, Any]]:
    specs: dict[str, dict[str, Any]] = {}
    if "mim_head.proj.weight" in tensors:
        specs["mim_head"] = {"kind": "mim", "embed_dim": dim, "vocab_size": tensors["mim_head.proj.weight"].shape[0],
                             "transform": "mim_head.transform.0.weight" in tensors, "eps": 1e-6}
    if "mlm_head.decoder.weight" in tensors:
        specs["mlm_head"] = {"kind": "mlm", "embed_dim": dim, "vocab_size": tensors["mlm_head.decoder.weight"].shape[0],
                             "eps": 1e-12}
    if "itc_head.image_proj.weight" in tensors:
        specs["itc_head"] = {"kind": "itc", "embed_dim": dim, "max_logit_scale": None}
        tensors.setdefault("itc_head.logit_scale", torch.tensor(math.log(1 / 0.07)))
    if "pooler.dense.weight" in tensors:
        specs["pooler"] = {"kind": "pooler", "embed_dim": dim}
    return specs


def fill_missing(tr: Translation, cfg: BackboneConfig) -> list[str]:
    """Backbone weights the file does not hold (the text path of a converted BEiT init, ...), from
    a model initialised with a fixed seed, as ContinualTransformer would initialise them."""
    from models.backbone import VLMoBackbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = {f"backbone.{k}": v for k, v in VLMoBackbone(cfg).state_dict().items()}
    missing = sorted(set(fresh) - set(tr.tensors))
    for key in missing:
        tr.tensors[key] = fresh[key]
    return missing


def adapters_of(tr: Translation, is_run: bool) -> dict[str, Any] | None:
    """LoRA settings of a run's adapters (alpha 1: scaling 1/rank). A released merged model still
    holds the adapters it merged; they are dropped, never applied twice."""
    from models.lora import is_adapter_key

    keys = sorted(k for k in tr.tensors if is_adapter_key(k))
    if not keys:
        return None
    rank = tr.tensors[next(k for k in keys if ".lora_A." in k)].shape[0]
    if is_run:
        return {"rank": int(rank), "alpha": 1.0}
    for key in keys:
        del tr.tensors[key]
    tr.notes.append(f"dropped {len(keys)} LoRA factors of a merged model (already inside its weights)")
    return None


def translate(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` in this project's layout, with its config, head specs, LoRA settings and (when it
    carries one) the DALL-E encoder; a run's optimizer state does not map and is left behind."""
    try:
        return _translate(ckpt)
    except (KeyError, ValueError, IndexError, TypeError, RuntimeError) as err:
        raise UserError(f"{ckpt.path} looks like a ContinualTransformer checkpoint but its weights do not have their "
                        f"layout ({type(err).__name__}: {str(err)[:120]}); it may be truncated or of another model") from None


def _translate(ckpt: Checkpoint) -> Checkpoint:
    args = dict(ckpt.extra.get("args") or {})
    cfg = infer_config(ckpt.model, args, str(ckpt.path))
    tr = rename_all(ckpt.model, str(ckpt.path))
    text_positions(tr, cfg)
    shared_table(tr, cfg)
    fold_token_types(tr, cfg.embed_dim)
    fresh = fill_missing(tr, cfg)
    is_run = "optimizer" in ckpt.extra and "epoch" in ckpt.extra
    lora = adapters_of(tr, is_run)
    specs = head_specs(tr.tensors, cfg.embed_dim)
    if fresh:
        groups = sorted({".".join(p for p in k.split(".")[:3] if not p.isdigit()) for k in fresh})
        tr.notes.append(f"initialised fresh (not in the file): {', '.join(groups)}")
    extra: dict[str, Any] = {"args": args, "origin": ORIGIN, "conversion_notes": tr.notes + [
        f"left out {d}" for d in tr.dropped[:3]] + ([f"... and {len(tr.dropped) - 3} more"] if len(tr.dropped) > 3 else [])}
    if is_run:
        extra.update(foreign_run=True, epoch=int(ckpt.extra["epoch"]))
    if lora:
        extra["lora"] = lora
    for part, tensors in tr.dall_e.items():
        extra[f"dall_e_{part}"] = tensors
    untrained = sorted({".".join(k.split(".")[:2]) for k in fresh})
    return Checkpoint(ckpt.path, tr.tensors, cfg.to_dict(), extra, {"heads": specs, "origin": ORIGIN, "untrained": untrained})
