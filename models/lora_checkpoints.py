"""Stage handover for LoRA runs: merged plain backbones, adapter-only files, and folding a run's
adapters into its base weights when a new stage starts from it (never twice)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from common.checkpoint_io import Checkpoint, save_weights
from common.errors import UserError
from models.lora import adapter_tensors, is_adapter_key, merge_adapters, plain_names

MERGED_FLAG = "lora_merged"


def lora_settings(ckpt: Checkpoint) -> dict[str, Any] | None:
    """`{"rank", "alpha"}` of the run that wrote `ckpt`, if it trained adapters."""
    if "lora" in ckpt.extra and ckpt.extra["lora"]:
        return dict(ckpt.extra["lora"])
    meta = ckpt.extra.get("metadata") or {}
    return json.loads(meta["lora"]) if "lora" in meta else None


def is_marked_merged(ckpt: Checkpoint) -> bool:
    meta = ckpt.extra.get("metadata") or {}
    return str(meta.get(MERGED_FLAG, "")).lower() == "true"


def fold_adapters(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], bool]:
    """The checkpoint's tensors with any adapters merged into their base weights (and whether
    there were adapters). Refuses files whose adapters would land on already merged weights."""
    tensors = plain_names(ckpt.model)
    if not any(is_adapter_key(k) for k in tensors):
        return tensors, False
    if is_marked_merged(ckpt):
        raise UserError(f"{ckpt.path} is marked as merged but still holds LoRA adapter weights; applying them would "
                        f"count the adapters twice; re-create it with util/save_merged_lora_model.py from the run checkpoint")
    if not any(k.endswith(".weight") and not is_adapter_key(k) and ".blocks." in k for k in tensors):
        raise UserError(f"{ckpt.path} holds LoRA adapters only, no base weights; start from the merged checkpoint "
                        f"(merged_model.safetensors) or the run checkpoint instead")
    settings = lora_settings(ckpt)
    if not settings:
        raise UserError(f"{ckpt.path} has LoRA adapter weights but no record of --lora_rank/--lora_alpha; use the run "
                        f"checkpoint written by main_pretrain_cook.py")
    return merge_adapters(tensors, settings["alpha"] / settings["rank"]), True


def save_merged_weights(path: str | Path, merged: dict[str, torch.Tensor], backbone_config: dict[str, Any],
                        lora: dict[str, Any], source: str, info: dict[str, Any] | None = None) -> None:
    """Write already merged tensors, marked as merged (so adapters are never applied to them again)."""
    save_weights(path, merged, backbone_config, {MERGED_FLAG: "true", "merged_from": source,
                                                 "merged_lora": json.dumps(lora)}, info)


def save_merged_model(path: str | Path, tensors: dict[str, torch.Tensor], backbone_config: dict[str, Any],
                      lora: dict[str, Any], source: str, info: dict[str, Any] | None = None) -> None:
    """A plain backbone (+ heads) with the adapters merged and no adapter keys."""
    save_merged_weights(path, merge_adapters(plain_names(tensors), lora["alpha"] / lora["rank"]), backbone_config,
                        lora, source, info)


def save_adapters(path: str | Path, tensors: dict[str, torch.Tensor], backbone_config: dict[str, Any],
                  lora: dict[str, Any], info: dict[str, Any] | None = None) -> None:
    """Adapter weights only (safetensors), with the rank and alpha they need."""
    save_weights(path, adapter_tensors(tensors), backbone_config, {"lora": json.dumps(lora), "adapters_only": "true"},
                 info)
