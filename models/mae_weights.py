"""MAE's released weights read in this project's layout, as ContinualTransformer's are
(`models/checkpoints.py` reads them everywhere a checkpoint is taken): facebookresearch/mae's
`mae_pretrain_vit_*.pth` (the encoder) and `mae_visualize_vit_*.pth` (with its decoder), timm's
`vit_*_patch16_224.mae` state dicts, and Hugging Face `ViTMAEForPreTraining` / `ViTMAEModel` folders
in transformers 4's names (`attention.attention.query`, what the hub's `facebook/vit-mae-*` hold), 5's
module names (`q_proj` / `o_proj`) or what 5's `save_pretrained` writes (4's, the decoder's blocks as
`decoder_encoder.layer`).

A ViT block is this backbone's shared-FFN block with absolute positions, no layer scale and no
relative bias. Its attention's key bias adds `q · b_k` to every logit of a query, a constant that
softmax cancels: it is left out (exactly, up to rounding), and the query and value biases kept."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from common.checkpoint_io import Checkpoint, is_safetensors, load_safetensors_file, load_torch_file
from common.errors import UserError
from models.config import BackboneConfig

# Hugging Face names (transformers 4 and 5) -> MAE's own; q, k and v are fused afterwards
HF_TO_MAE = [
    (r"^(?:vit\.)?embeddings\.cls_token$", "cls_token"),
    (r"^(?:vit\.)?embeddings\.position_embeddings$", "pos_embed"),
    (r"^(?:vit\.)?embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.", r"blocks.\1."),
    # transformers 4 (and 5's modules): decoder_layers; what transformers 5.25's save_pretrained writes
    (r"^decoder\.decoder_(?:layers|encoder\.layer)\.(\d+)\.", r"decoder_blocks.\1."),
    (r"^(?:vit\.)?layernorm\.", "norm."),
    (r"^decoder\.(decoder_embed|decoder_norm|decoder_pred|decoder_pos_embed|mask_token)", r"\1"),
    (r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.(?:attention\.query|q_proj)\.", ".attn.q."), (r"\.attention\.(?:attention\.key|k_proj)\.", ".attn.k."),
    (r"\.attention\.(?:attention\.value|v_proj)\.", ".attn.v."),
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.(?:intermediate\.dense|mlp\.fc1)\.", ".mlp.fc1."), (r"\.(?:output\.dense|mlp\.fc2)\.", ".mlp.fc2."),
]
# MAE's names -> ours (the key bias of `attn.qkv.bias` is split off first)
MAE_TO_OURS = [
    (r"^(cls_token|pos_embed|patch_embed\.proj\.\w+|norm\.\w+)$", r"backbone.\1"),
    (r"^blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(\w+)$", r"backbone.blocks.\1.\2.\3"),
    (r"^blocks\.(\d+)\.attn\.(qkv\.weight|q_bias|v_bias)$", r"backbone.blocks.\1.attn.\2"),
    (r"^(mask_token|decoder_embed\.\w+|decoder_norm\.\w+|decoder_pred\.\w+)$", r"mae_decoder.\1"),
    (r"^decoder_blocks\.(\d+)\.(.+)$", r"mae_decoder.decoder_blocks.\1.\2"),
]
LEFT_OUT = [(r"^(head|fc_norm)\.", "the fine-tuned classification head (not part of MAE's encoder)"),
            (r"^decoder_pos_embed$", "the decoder's fixed sine-cosine positions (made again from the grid)"),
            (r"^classifier\.", "Hugging Face's classification head")]
# widths of MAE's released encoders and decoders -> their heads (ViT-H: 80 dims a head)
ENCODER_HEADS = {768: 12, 1024: 16, 1280: 16}
DECODER_HEADS = {512: 16}
ORIGIN = "MAE"


def is_mae(ckpt: Checkpoint) -> bool:
    """A ViT of MAE's family: no config of ours, patch embedding and absolute positions, and neither
    BEiT's relative tables nor its q/v biases."""
    keys = ckpt.model.keys()
    if ckpt.backbone_config is not None or any("relative_position" in k or k.endswith("q_bias") for k in keys):
        return False
    timm_like = "blocks.0.attn.qkv.bias" in keys and "pos_embed" in keys  # BEiT's qkv has no bias of its own
    hf_like = any(re.match(r"^(vit\.)?embeddings\.position_embeddings$", k) for k in keys) and \
        any(k.endswith(("attention.attention.key.bias", "attention.k_proj.bias")) for k in keys)  # BEiT: no key bias
    return timm_like or hf_like


def mae_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any source's tensors in MAE's own names, q/k/v fused into qkv."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        for pattern, replacement in HF_TO_MAE:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    for key in [k for k in out if re.search(r"\.attn\.q\.(weight|bias)$", k)]:
        base, kind = key.rsplit(".attn.q.", 1)
        out[f"{base}.attn.qkv.{kind}"] = torch.cat([out.pop(f"{base}.attn.{part}.{kind}") for part in "qkv"])
    return out


def split_qkv_bias(t: dict[str, torch.Tensor], notes: list[str]) -> None:
    """The encoder's `attn.qkv.bias` -> our q and v biases; the key bias is left out (softmax cancels
    it). The decoder keeps MAE's blocks as they are."""
    biases = [k for k in t if k.startswith("blocks.") and k.endswith("attn.qkv.bias")]
    for key in biases:
        q, _, v = t.pop(key).chunk(3)
        block = key.removesuffix("qkv.bias")
        t[block + "q_bias"], t[block + "v_bias"] = q, v
    if biases:
        notes.append("the attention's key biases left out: each adds one constant to all logits of a query, which "
                     "softmax cancels")


def infer_config(t: dict[str, torch.Tensor], hf: dict[str, Any], notes: list[str]) -> BackboneConfig:
    dim, chans, patch, _ = t["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in t if (m := re.match(r"blocks\.(\d+)\.", k)))
    heads = hf.get("num_attention_heads") or ENCODER_HEADS.get(dim)
    if heads is None:
        heads = max(1, dim // 64)
        notes.append(f"the file does not record its attention heads: read as {heads} of 64 dims (MAE's); another "
                     f"count gives other outputs")
    grid = math.isqrt(t["pos_embed"].shape[1] - 1)
    return BackboneConfig(img_size=grid * patch, patch_size=patch, in_chans=chans, embed_dim=dim, depth=depth,
                          num_heads=int(heads), mlp_ratio=t["blocks.0.mlp.fc1.weight"].shape[0] / dim, qkv_bias=True,
                          layer_scale_init_value=0.0, use_rel_pos_bias=False, use_abs_pos_emb=True,
                          final_norm="norm.weight" in t, layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)))


def decoder_spec(t: dict[str, torch.Tensor], cfg: BackboneConfig, hf: dict[str, Any],
                 notes: list[str]) -> dict[str, Any] | None:
    if "decoder_embed.weight" not in t:
        return None
    width = t["decoder_embed.weight"].shape[0]
    heads = hf.get("decoder_num_attention_heads") or DECODER_HEADS.get(width)
    if heads is None:
        heads = max(1, width // 32)
        notes.append(f"the decoder does not record its attention heads: read as {heads} of 32 dims (MAE's)")
    depth = len({k.split(".")[1] for k in t if k.startswith("decoder_blocks.")})
    return {"kind": "mae_decoder", "embed_dim": cfg.embed_dim, "decoder_embed_dim": width, "depth": depth,
            "num_heads": int(heads), "patch_size": cfg.patch_size, "grid": list(cfg.grid_size), "in_chans": cfg.in_chans,
            "eps": cfg.layer_norm_eps, "mlp_ratio": t["decoder_blocks.0.mlp.fc1.weight"].shape[0] / width,
            # MAE's visualisation models predict raw pixels; Hugging Face's config says
            "mask_ratio": float(hf.get("mask_ratio", 0.75)), "norm_pix_loss": bool(hf.get("norm_pix_loss", False))}


def rename(t: dict[str, torch.Tensor], path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, left, unknown = {}, [], []
    for key, value in t.items():
        reason = next((why for pattern, why in LEFT_OUT if re.match(pattern, key)), None)
        if reason is not None:
            left.append(reason)
            continue
        new = next((re.sub(p, r, key) for p, r in MAE_TO_OURS if re.match(p, key)), None)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise UserError(f"{path} has weights an MAE / ViT encoder does not ({', '.join(sorted(unknown)[:4])}); it is "
                        f"another architecture")
    return out, sorted(set(left))


def translate(ckpt: Checkpoint, hf_config: dict[str, Any] | None = None) -> Checkpoint:
    """`ckpt` (MAE's, timm's or Hugging Face's tensors) in this project's layout: the backbone, the
    decoder as the `mae_decoder` head, the text path fresh (and recorded as untrained)."""
    from models.continual_transformer import Translation, fill_missing

    hf = hf_config or {}
    notes: list[str] = []
    t = mae_names(ckpt.model)
    if "pos_embed" not in t or "patch_embed.proj.weight" not in t:
        raise UserError(f"{ckpt.path} has no patch embedding or positions; it is not a ViT encoder checkpoint")
    cfg = infer_config(t, hf, notes)
    spec = decoder_spec(t, cfg, hf, notes)
    split_qkv_bias(t, notes)
    tensors, left = rename(t, str(ckpt.path))
    tr = Translation(tensors=tensors)
    fresh = fill_missing(tr, cfg)
    if fresh:
        groups = sorted({".".join(p for p in k.split(".")[:3] if not p.isdigit()) for k in fresh})
        notes.append(f"initialised fresh (not in the file): {', '.join(groups)}")
    notes += [f"left out {why}" for why in left]
    origin = "Hugging Face ViTMAE" if hf or any(k.startswith(("vit.", "embeddings.")) for k in ckpt.model) else ORIGIN
    extra = {"origin": origin, "conversion_notes": notes}
    info = {"heads": {"mae_decoder": spec} if spec else {}, "origin": origin,
            "untrained": sorted({".".join(k.split(".")[:2]) for k in fresh})}
    return Checkpoint(ckpt.path, tr.tensors, cfg.to_dict(), extra, info)


HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_MODEL_TYPES = ("vit_mae", "vit")


def is_hf_vit_folder(path: Path) -> bool:
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in HF_MODEL_TYPES
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_hf_folder(path: Path) -> Checkpoint:
    """A Hugging Face ViTMAE / ViT model folder (config.json and its weights), translated."""
    config = json.loads((path / "config.json").read_text())
    for name in HF_WEIGHTS:
        if (path / name).is_file():
            file = path / name
            tensors = load_safetensors_file(file)[0] if is_safetensors(file) else load_torch_file(file)
            return translate(Checkpoint(path, dict(tensors), None), config)
    raise UserError(f"{path} has config.json but no {' or '.join(HF_WEIGHTS)}; the download is incomplete")
