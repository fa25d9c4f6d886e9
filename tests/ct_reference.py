"""An independent plain-torch computation of what ContinualTransformer's model outputs for a state
dict in its key names (written from its architecture: BEiT blocks with one relative-position table
for all layers, BERT text embeddings with relative positions only, token types added in
single-modality passes, loralib adapters with scaling 1/rank). Nothing here calls this project's
model code; tests/ct_writers.py writes their files."""
from __future__ import annotations

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
