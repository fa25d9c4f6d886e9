"""ContinualTransformer's checkpoint layouts, built with random weights from their documented key
names and shapes, and an independent plain-torch computation of what their model outputs for
them (written from their architecture: BEiT blocks with a shared relative-position table, BERT
text embeddings with relative positions only, token types added in single-modality passes, loralib
adapters with scaling 1/rank). Nothing here calls this project's model code."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Dims:
    dim: int = 64
    depth: int = 2
    heads: int = 4
    patch: int = 8
    image: int = 32
    text_len: int = 196  # max_text_len_of_initckpt: the text part of the table
    vocab: int = 120
    visual_vocab: int = 64

    @property
    def grid(self) -> int:
        return self.image // self.patch

    @property
    def image_rows(self) -> int:
        return (2 * self.grid - 1) ** 2 + 3


def _rand(gen, *shape, scale=0.2):
    return torch.randn(*shape, generator=gen) * scale


def backbone_state(d: Dims, gen, lora_rank: int = 0) -> dict[str, torch.Tensor]:
    s = {"transformer.patch_embed.proj.weight": _rand(gen, d.dim, 3, d.patch, d.patch),
         "transformer.patch_embed.proj.bias": _rand(gen, d.dim), "transformer.cls_token": _rand(gen, 1, 1, d.dim),
         "transformer.norm.weight": 1 + _rand(gen, d.dim), "transformer.norm.bias": _rand(gen, d.dim)}
    linears = {"attn.qkv": (3 * d.dim, d.dim), "attn.proj": (d.dim, d.dim), "mlp.fc1": (4 * d.dim, d.dim),
               "mlp.fc2": (d.dim, 4 * d.dim)}
    for i in range(d.depth):
        b = f"transformer.blocks.{i}."
        for norm in ("norm1", "norm2"):
            s[b + norm + ".weight"], s[b + norm + ".bias"] = 1 + _rand(gen, d.dim), _rand(gen, d.dim)
        for name, (out, inp) in linears.items():
            s[b + name + ".weight"] = _rand(gen, out, inp, scale=inp ** -0.5)
            if name != "attn.qkv":
                s[b + name + ".bias"] = _rand(gen, out)
            if lora_rank:
                s[b + name + ".lora_A"] = _rand(gen, lora_rank, inp, scale=0.1)
                s[b + name + ".lora_B"] = _rand(gen, out, lora_rank, scale=0.1)
        s[b + "attn.q_bias"], s[b + "attn.v_bias"] = _rand(gen, d.dim), _rand(gen, d.dim)
        s[b + "gamma_1"], s[b + "gamma_2"] = 0.1 + _rand(gen, d.dim, scale=0.05), 0.1 + _rand(gen, d.dim, scale=0.05)
    s["relative_position_bias_table"] = _rand(gen, d.image_rows + 2 * d.text_len + 2, d.depth * d.heads)
    return s


def full_state(d: Dims, gen, lora_rank: int = 0) -> dict[str, torch.Tensor]:
    """A run checkpoint's `model`: backbone, text embeddings, token types, every head."""
    s = backbone_state(d, gen, lora_rank)
    s.update({"mask_token": _rand(gen, 1, 1, d.dim), "token_type_embeddings.weight": _rand(gen, 2, d.dim),
              "text_embeddings.word_embeddings.weight": _rand(gen, d.vocab, d.dim),
              "text_embeddings.position_embeddings.weight": _rand(gen, 40, d.dim),  # unused: relative positions
              "text_embeddings.token_type_embeddings.weight": _rand(gen, 2, d.dim),
              "text_embeddings.LayerNorm.weight": 1 + _rand(gen, d.dim), "text_embeddings.LayerNorm.bias": _rand(gen, d.dim),
              "text_embeddings.position_ids": torch.arange(40)[None],
              "pooler.dense.weight": _rand(gen, d.dim, d.dim), "pooler.dense.bias": _rand(gen, d.dim),
              "mim_score.transform.0.weight": _rand(gen, d.dim, d.dim), "mim_score.transform.0.bias": _rand(gen, d.dim),
              "mim_score.transform.2.weight": 1 + _rand(gen, d.dim), "mim_score.transform.2.bias": _rand(gen, d.dim),
              "mim_score.decoder.weight": _rand(gen, d.visual_vocab, d.dim), "mim_score.bias": _rand(gen, d.visual_vocab),
              "mlm_score.transform.dense.weight": _rand(gen, d.dim, d.dim),
              "mlm_score.transform.dense.bias": _rand(gen, d.dim),
              "mlm_score.transform.LayerNorm.weight": 1 + _rand(gen, d.dim),
              "mlm_score.transform.LayerNorm.bias": _rand(gen, d.dim),
              "mlm_score.decoder.weight": _rand(gen, d.vocab, d.dim), "mlm_score.bias": _rand(gen, d.vocab),
              "itc_head.fc_img.weight": _rand(gen, d.dim, d.dim), "itc_head.fc_txt.weight": _rand(gen, d.dim, d.dim),
              "logit_scale": torch.tensor(math.log(1 / 0.07))})
    return s


# ---- their forward ---------------------------------------------------------------------------------
def image_index(d: Dims) -> torch.Tensor:
    g = d.grid
    coords = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (g - 1)
    index = torch.zeros(g * g + 1, g * g + 1, dtype=torch.long)
    index[1:, 1:] = rel[..., 0] * (2 * g - 1) + rel[..., 1]
    index[0, :], index[:, 0], index[0, 0] = d.image_rows - 3, d.image_rows - 2, d.image_rows - 1
    return index


def text_index(d: Dims, length: int) -> torch.Tensor:
    total = d.image_rows + 2 * d.text_len + 2
    pos = torch.arange(length - 1)
    index = torch.zeros(length, length, dtype=torch.long)
    index[1:, 1:] = (pos[None, :] - pos[:, None]) - (2 - d.text_len) + d.image_rows + 2
    index[0, :], index[:, 0], index[0, 0] = total - 3, total - 2, total - 1
    return index


def _linear(s, name, x, lora_rank, bias=None):
    out = x @ s[name + ".weight"].t()
    if bias is not None:
        out = out + bias
    elif name + ".bias" in s:
        out = out + s[name + ".bias"]
    if lora_rank and name + ".lora_A" in s:
        out = out + (x @ s[name + ".lora_A"].t() @ s[name + ".lora_B"].t()) / lora_rank
    return out


def blocks(s, d: Dims, x, index, keep=None, lora_rank=0):
    bias_all = s["relative_position_bias_table"][index]  # [n, n, depth*heads]
    for i in range(d.depth):
        b = f"transformer.blocks.{i}."
        h = F.layer_norm(x, (d.dim,), s[b + "norm1.weight"], s[b + "norm1.bias"], 1e-6)
        qkv_bias = torch.cat([s[b + "attn.q_bias"], torch.zeros(d.dim), s[b + "attn.v_bias"]])
        qkv = _linear(s, b + "attn.qkv", h, lora_rank, qkv_bias).view(x.shape[0], x.shape[1], 3, d.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q * (d.dim // d.heads) ** -0.5) @ k.transpose(-2, -1)
        attn = attn + bias_all[..., i * d.heads:(i + 1) * d.heads].permute(2, 0, 1)
        if keep is not None:
            attn = attn.masked_fill(~keep.bool()[:, None, None, :], float("-inf"))
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        x = x + s[b + "gamma_1"] * _linear(s, b + "attn.proj", out, lora_rank)
        h = F.layer_norm(x, (d.dim,), s[b + "norm2.weight"], s[b + "norm2.bias"], 1e-6)
        x = x + s[b + "gamma_2"] * _linear(s, b + "mlp.fc2", F.gelu(_linear(s, b + "mlp.fc1", h, lora_rank)), lora_rank)
    return F.layer_norm(x, (d.dim,), s["transformer.norm.weight"], s["transformer.norm.bias"], 1e-6)


@torch.no_grad()
def image_features(s, d: Dims, images, masked=None, lora_rank=0):
    x = F.conv2d(images, s["transformer.patch_embed.proj.weight"], s["transformer.patch_embed.proj.bias"],
                 stride=d.patch).flatten(2).transpose(1, 2)
    if masked is not None:
        w = masked.float()[..., None]
        x = x * (1 - w) + s["mask_token"] * w
    x = torch.cat([s["transformer.cls_token"].expand(len(x), -1, -1), x], 1)
    if "token_type_embeddings.weight" in s:
        x = x + s["token_type_embeddings.weight"][1]
    return blocks(s, d, x, image_index(d), lora_rank=lora_rank)


@torch.no_grad()
def text_features(s, d: Dims, ids, keep, lora_rank=0):
    x = s["text_embeddings.word_embeddings.weight"][ids] + s["text_embeddings.token_type_embeddings.weight"][0]
    x = F.layer_norm(x, (d.dim,), s["text_embeddings.LayerNorm.weight"], s["text_embeddings.LayerNorm.bias"], 1e-12)
    x = x + s["token_type_embeddings.weight"][0]
    return blocks(s, d, x, text_index(d, ids.shape[1]), keep, lora_rank)


@torch.no_grad()
def mim_logits(s, d: Dims, features):
    h = F.gelu(features @ s["mim_score.transform.0.weight"].t() + s["mim_score.transform.0.bias"])
    h = F.layer_norm(h, (d.dim,), s["mim_score.transform.2.weight"], s["mim_score.transform.2.bias"], 1e-6)
    return h @ s["mim_score.decoder.weight"].t() + s["mim_score.bias"]


@torch.no_grad()
def mlm_logits(s, d: Dims, features):
    h = F.gelu(features @ s["mlm_score.transform.dense.weight"].t() + s["mlm_score.transform.dense.bias"])
    h = F.layer_norm(h, (d.dim,), s["mlm_score.transform.LayerNorm.weight"], s["mlm_score.transform.LayerNorm.bias"],
                     1e-12)
    return h @ s["mlm_score.decoder.weight"].t() + s["mlm_score.bias"]


@torch.no_grad()
def itc_similarity(s, image_cls, text_cls):
    image = F.normalize(image_cls @ s["itc_head.fc_img.weight"].t(), dim=-1)
    text = F.normalize(text_cls @ s["itc_head.fc_txt.weight"].t(), dim=-1)
    return s["logit_scale"].exp() * image @ text.t()


def merged(s: dict[str, torch.Tensor], lora_rank: int) -> dict[str, torch.Tensor]:
    """What their `model.eval()` leaves in the weights (the adapters stay in the state dict)."""
    out = dict(s)
    for key in s:
        if key.endswith(".lora_A"):
            base = key[: -len(".lora_A")]
            out[base + ".weight"] = s[base + ".weight"] + s[base + ".lora_B"] @ s[key] / lora_rank
    return out


def inputs(d: Dims, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, d.image, d.image, generator=gen)
    masked = torch.rand(3, d.grid ** 2, generator=gen) < 0.4
    ids = torch.randint(5, d.vocab, (3, 9), generator=gen)
    ids[:, 0] = 2
    keep = torch.ones_like(ids)
    keep[1, 6:] = 0
    return images, masked, ids, keep
