"""The fused image-text forward (VLMo's pair path) against a naive re-implementation from the
model's weights: [text; image] concatenated with token types, padded captions masked as keys,
the relative position bias built pair by pair from the shared table (image offsets for image
tokens, 1-D offsets for text, one entry each way between the modalities, the [CLS] rows), and each
token's FFN chosen by its modality below `vlffn_start_layer_index` and the vision-language expert
from there on. Only the text embedding (word + position + LayerNorm) is taken from the model."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models import create_model
from tests.helpers import max_diff, randomize_

GRID, LENGTH, START = 3, 5, 2


def cls_entry(q: int, k: int, end: int) -> int:
    """A modality's three [CLS] rows are the last of its part of the table (which ends at `end`):
    cls->cls, cls->token, token->cls; -1 between two other tokens."""
    if q == 0 and k == 0:
        return end - 1
    if q == 0:
        return end - 3
    return end - 2 if k == 0 else -1


def naive_bias(table: torch.Tensor, text_len: int, max_text_len: int) -> torch.Tensor:
    """`[n, n, columns]` bias of the [text (text_len); image cls + GRID x GRID] sequence, entry by entry."""
    window = (2 * GRID - 1) ** 2
    r = window + 3  # image rows: offsets, then cls->patch, patch->cls, cls->cls
    total = table.shape[0]
    n = text_len + 1 + GRID * GRID
    index = torch.empty(n, n, dtype=torch.long)
    for q in range(n):
        for k in range(n):
            q_text, k_text = q < text_len, k < text_len
            if q_text and k_text:
                index[q, k] = cls_entry(q, k, total)
                if index[q, k] < 0:  # key position minus query position, centred
                    index[q, k] = r + 2 + (k - q) + (max_text_len - 2)
            elif q_text:
                index[q, k] = r  # text -> image
            elif k_text:
                index[q, k] = r + 1  # image -> text
            else:
                qi, ki = q - text_len, k - text_len  # 0: the image [CLS]
                index[q, k] = cls_entry(qi, ki, r)
                if index[q, k] < 0:  # query patch minus key patch, in rows and columns
                    (qr, qc), (kr, kc) = divmod(qi - 1, GRID), divmod(ki - 1, GRID)
                    index[q, k] = (qr - kr + GRID - 1) * (2 * GRID - 1) + (qc - kc + GRID - 1)
    return table[index]


def naive_pair(model, images: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    s, cfg = dict(model.state_dict()), model.cfg
    heads, dim, eps = cfg.num_heads, cfg.embed_dim, cfg.layer_norm_eps
    text = model.text_embeddings(ids) + s["token_type_embeddings.weight"][0]
    patches = F.conv2d(images, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=cfg.patch_size)
    image = torch.cat([s["cls_token"].expand(len(images), -1, -1), patches.flatten(2).transpose(1, 2)], 1)
    x = torch.cat([text, image + s["token_type_embeddings.weight"][1]], 1)  # [B, n, D]
    bias = naive_bias(s["relative_position_bias_table"], ids.shape[1], cfg.max_text_len)  # [n, n, depth*heads]
    keys = torch.cat([keep.bool(), torch.ones(len(images), image.shape[1], dtype=torch.bool)], 1)  # [B, n]
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), s[b + "norm1.weight"], s[b + "norm1.bias"], eps)
        qkv = h @ s[b + "attn.qkv.weight"].t() + torch.cat([s[b + "attn.q_bias"], torch.zeros(dim), s[b + "attn.v_bias"]])
        q, k, v = qkv.view(x.shape[0], x.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5 + bias[..., i * heads:(i + 1) * heads].permute(2, 0, 1)
        attn = attn.masked_fill(~keys[:, None, None, :], float("-inf"))
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(x.shape) @ s[b + "attn.proj.weight"].t()
        x = x + s[b + "gamma_1"] * (out + s[b + "attn.proj.bias"])
        ffn = torch.empty_like(x)
        for t in range(x.shape[1]):  # each token's expert
            expert = "vl" if i >= START else ("text" if t < ids.shape[1] else "imag")
            h = F.layer_norm(x[:, t], (dim,), s[f"{b}norm2_{expert}.weight"], s[f"{b}norm2_{expert}.bias"], eps)
            h = F.gelu(h @ s[f"{b}mlp_{expert}.fc1.weight"].t() + s[f"{b}mlp_{expert}.fc1.bias"])
            ffn[:, t] = h @ s[f"{b}mlp_{expert}.fc2.weight"].t() + s[f"{b}mlp_{expert}.fc2.bias"]
        x = x + s[b + "gamma_2"] * ffn
    return F.layer_norm(x, (dim,), s["norm.weight"], s["norm.bias"], eps)


def test_the_pair_forward_equals_a_naive_re_implementation():
    torch.manual_seed(0)
    model = create_model("vlmo_tiny_patch16", img_size=GRID * 8, patch_size=8, ffn="multiway", vocab_size=50,
                         max_text_len=12, vlffn_start_layer_index=START, drop_path_rate=0.0)
    randomize_(model, scale=0.05).eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, GRID * 8, GRID * 8, generator=gen)
    ids = torch.randint(1, 50, (2, LENGTH), generator=gen)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # the second caption is padded
    with torch.no_grad():
        ours, naive = model.encode_pair(images, ids, keep), naive_pair(model, images, ids, keep)
    assert max_diff(ours, naive) < 1e-5
    assert max_diff(ours[1, :3], naive_pair(model, images, ids, torch.ones_like(keep))[1, :3]) > 1e-3  # masking matters
