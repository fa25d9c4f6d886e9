"""Prediction and search from a file alone: a checkpoint of any stage (`.pth` / `.safetensors`) or
an ONNX export folder. Both serve the same calls: `classify`, `embed_images`, `embed_texts`, with
their `preprocessing`, `class_names` and `text_tokenizer()`."""
from __future__ import annotations

from pathlib import Path

from common.errors import UserError
from serving.checkpoint import CheckpointServable, load_checkpoint_servable
from serving.onnx_export import OnnxServable


def open_servable(path: str | Path) -> CheckpointServable | OnnxServable:
    path = Path(path)
    if path.is_dir():
        if any(path.glob("*.onnx")):
            return OnnxServable(path)
        raise UserError(f"{path} is a folder without .onnx files; pass a checkpoint file or an ONNX export folder")
    return load_checkpoint_servable(str(path))


__all__ = ["CheckpointServable", "OnnxServable", "open_servable"]
