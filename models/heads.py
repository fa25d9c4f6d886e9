"""Task heads that checkpoints carry next to the backbone. Every head describes itself with
`spec()` (a plain dict of its constructor arguments plus its `kind`), which checkpoints record,
so `build_head(spec)` rebuilds any head a checkpoint holds without knowing the run that made it."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.mae_decoder import MAEDecoder
from models.patch_aggregation import PatchAggregationHead
from models.segmentation_head import SegmentationHead


class MIMHead(nn.Module):
    """BEiT's `lm_head`: token features -> logits over the visual vocabulary. `transform=True`
    adds ContinualTransformer's Linear + GELU + LayerNorm before the projection."""

    kind = "mim"

    def __init__(self, embed_dim: int, vocab_size: int = 8192, transform: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.embed_dim, self.vocab_size, self.eps = embed_dim, vocab_size, eps
        self.proj = nn.Linear(embed_dim, vocab_size)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        self.transform = (nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.LayerNorm(embed_dim, eps=eps))
                          if transform else None)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "embed_dim": self.embed_dim, "vocab_size": self.vocab_size,
                "transform": self.transform is not None, "eps": self.eps}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features if self.transform is None else self.transform(features))


class MLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then logits over the text vocabulary."""

    kind = "mlm"

    def __init__(self, embed_dim: int, vocab_size: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.embed_dim, self.vocab_size, self.eps = embed_dim, vocab_size, eps
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.decoder = nn.Linear(embed_dim, vocab_size)
        for layer in (self.dense, self.decoder):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "embed_dim": self.embed_dim, "vocab_size": self.vocab_size, "eps": self.eps}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(features))))


class ITCHead(nn.Module):
    """VLMo's contrastive projections of the image and text [CLS] features, and a learnable
    temperature (CLIP's init 1/0.07; the logit scale is capped at `max_logit_scale`, 100 as in
    CLIP/VLMo, None for ContinualTransformer's uncapped scale)."""

    kind = "itc"

    def __init__(self, embed_dim: int, max_logit_scale: float | None = 100.0) -> None:
        super().__init__()
        self.embed_dim, self.max_logit_scale = embed_dim, max_logit_scale
        self.image_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        for layer in (self.image_proj, self.text_proj):
            nn.init.trunc_normal_(layer.weight, std=0.02)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "embed_dim": self.embed_dim, "max_logit_scale": self.max_logit_scale}

    def embed_image(self, cls_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(cls_features).float(), dim=-1)

    def embed_text(self, cls_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(cls_features).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        scale = self.logit_scale.exp()
        return scale if self.max_logit_scale is None else scale.clamp(max=self.max_logit_scale)


class Pooler(nn.Module):
    """BERT/VLMo pooler: Linear + Tanh on the [CLS] feature (what fusion heads read)."""

    kind = "pooler"

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.dense = nn.Linear(embed_dim, embed_dim)
        nn.init.trunc_normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "embed_dim": self.embed_dim}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(tokens[:, 0]))


class ITMHead(nn.Module):
    """VLMo's image-text matching classifier (`itm_score`): match / no match from the pooled fused
    [CLS] feature."""

    kind = "itm"

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.fc = nn.Linear(embed_dim, 2)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "embed_dim": self.embed_dim}

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)  # [B, 2]: logit of "no match", of "match"


class AnswerHead(nn.Module):
    """VLMo's classifier on pooled fused features (`vqa_classifier`, `nlvr2_classifier`): Linear to
    `hidden`, LayerNorm, GELU, Linear to the outputs (answers of the vocabulary; false / true)."""

    kind = "answer"

    def __init__(self, in_features: int, hidden: int, num_outputs: int) -> None:
        super().__init__()
        self.in_features, self.hidden, self.num_outputs = in_features, hidden, num_outputs
        self.layers = nn.Sequential(nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                    nn.Linear(hidden, num_outputs))
        for layer in (self.layers[0], self.layers[3]):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "hidden": self.hidden,
                "num_outputs": self.num_outputs}

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled)


HEAD_KINDS: dict[str, type[nn.Module]] = {cls.kind: cls for cls in (MIMHead, MLMHead, ITCHead, Pooler, ITMHead,
                                                                     AnswerHead, SegmentationHead,
                                                                     PatchAggregationHead, MAEDecoder)}


def build_head(spec: dict[str, Any]) -> nn.Module:
    """The head a recorded `spec` describes (fresh weights)."""
    values = dict(spec)
    kind = values.pop("kind", None)
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; known: {', '.join(sorted(HEAD_KINDS))}")
    return HEAD_KINDS[kind](**values)
