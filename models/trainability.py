"""Which parameters a run trains, decided once when the run is built (never inside `forward`).

Full training: everything the mode uses. LoRA: base weights freeze; the adapters, the mode's heads,
the final norm, the text embeddings in stages that read text, and `--trainable_extra` patterns train.
Parameters of input paths the mode never takes are frozen in both cases (they would get no gradient)."""
from __future__ import annotations

from collections import Counter
from fnmatch import fnmatch

from common.errors import UserError
from models.lora import is_adapter_key
from models.modes.base import PretrainMode


def _group(name: str) -> str:
    if is_adapter_key(name):
        return "LoRA adapters"
    if not name.startswith("backbone."):
        return "heads"
    if name.startswith("backbone.text_embeddings."):
        return "text embeddings"
    if name.startswith("backbone.norm."):
        return "final norm"
    return "backbone"


def configure_trainable(task: PretrainMode, lora: bool, trainable_extra: list[str] | None = None,
                        lora_factors: str = "both") -> dict[str, int]:
    """Set `requires_grad` on every parameter of `task`; returns trainable parameter counts per group.
    `lora_factors`: "both", or only "A" / "B" (ContinualTransformer trains B alone in image-text stages)."""
    extra = list(trainable_extra or [])
    unused = set(task.frozen_parameter_names())
    matched = {pattern: False for pattern in extra}
    counts: Counter[str] = Counter()
    for name, param in task.named_parameters():
        hits = [p for p in extra if fnmatch(name, p) or fnmatch(name, f"backbone.{p}")]
        for p in hits:
            matched[p] = True
        if lora:
            group = _group(name)
            trainable = group in ("LoRA adapters", "heads", "final norm") or bool(hits) or (
                group == "text embeddings" and "text" in task.paths)
            if group == "LoRA adapters" and lora_factors != "both":
                trainable = f".lora_{lora_factors}." in name
        else:
            trainable = True
        trainable = trainable and name not in unused
        param.requires_grad_(trainable)
        if trainable:
            counts["extra" if hits and lora and _group(name) == "backbone" else _group(name)] += param.numel()
    unmatched = [p for p, hit in matched.items() if not hit]
    if unmatched:
        raise UserError(f"--trainable_extra {' '.join(unmatched)} matches no parameter; use glob patterns on names such "
                        f"as 'blocks.*.norm1.*' or 'relative_position_bias_table'")
    return dict(counts)
