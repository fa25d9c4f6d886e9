"""The one way heads come out of checkpoints: by name (`mim_head`, `mlm_head`, `itc_head`,
`pooler`, `classifier`, ...), rebuilt from the spec the checkpoint records (or, for files that
predate specs, from tensor shapes), and loaded strictly."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.checkpoint_io import Checkpoint
from models.config import BackboneConfig
from models.heads import build_head
from models.pretrained import load_strict, split_prefix

BACKBONE = "backbone"


def head_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Every non-backbone module a checkpoint holds weights for, sorted."""
    return sorted({k.split(".")[0] for k in tensors} - {BACKBONE})


def recorded_specs(ckpt: Checkpoint) -> dict[str, dict[str, Any]]:
    return dict(ckpt.info.get("heads") or {})


def inferred_spec(name: str, state: dict[str, torch.Tensor], cfg: BackboneConfig) -> dict[str, Any] | None:
    """The spec of a head in a file that does not record one (this project's files before specs,
    converted BEiT), from its tensor shapes; None for heads that are not pretraining heads."""
    dim = cfg.embed_dim
    if name == "mim_head" and "proj.weight" in state:
        return {"kind": "mim", "embed_dim": dim, "vocab_size": state["proj.weight"].shape[0],
                "transform": "transform.0.weight" in state, "eps": 1e-6}
    if name == "mlm_head" and "decoder.weight" in state:  # the modes built it with the backbone's eps
        return {"kind": "mlm", "embed_dim": dim, "vocab_size": state["decoder.weight"].shape[0], "eps": cfg.layer_norm_eps}
    if name == "itc_head" and "logit_scale" in state:
        return {"kind": "itc", "embed_dim": dim}
    if name == "pooler" and "dense.weight" in state:
        return {"kind": "pooler", "embed_dim": dim}
    return None


def head_spec(ckpt: Checkpoint, name: str, cfg: BackboneConfig) -> dict[str, Any] | None:
    return recorded_specs(ckpt).get(name) or inferred_spec(name, split_prefix(ckpt.model, name + "."), cfg)


def load_head_into(module: nn.Module, ckpt: Checkpoint, name: str) -> bool:
    """Load `name.*` of `ckpt` into `module` strictly; False when the checkpoint has none."""
    state = split_prefix(ckpt.model, name + ".")
    if not state:
        return False
    load_strict(module, state, f"{ckpt.path} ({name})")
    return True


def built_for_loading(spec: dict[str, Any]) -> nn.Module:
    """A head whose weights are about to be loaded: its random init must not move the caller's
    RNG (runs stay reproducible whether or not a checkpoint carried extra heads)."""
    with torch.random.fork_rng(devices=[]):
        return build_head(spec)


def load_head(ckpt: Checkpoint, name: str, cfg: BackboneConfig) -> nn.Module | None:
    """The head `name` of `ckpt`, rebuilt and loaded; None when it has no such head."""
    spec = head_spec(ckpt, name, cfg)
    if spec is None:
        return None
    head = built_for_loading(spec)
    load_head_into(head, ckpt, name)
    return head


def head_specs_of(module: nn.Module, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """`{name: spec}` of the heads of `module` that describe themselves."""
    return {n: getattr(module, n).spec() for n in names if hasattr(getattr(module, n, None), "spec")}
