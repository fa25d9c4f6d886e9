"""An ONNX export folder (util/export.py --format onnx) served with onnxruntime: classification,
segmentation, ITC embeddings and fused-pair classification (VQA, NLVR2), with the preprocessing, class names and text tokenizer of its run_info.json."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from models.run_info import read_beside, tokenizer_from_record


class OnnxServable:
    def __init__(self, folder: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"{folder} is an ONNX export; serving it needs onnxruntime: pip install onnxruntime") from None
        self.info: dict[str, Any] = read_beside(folder)
        if "preprocessing" not in self.info:
            raise UserError(f"{folder} has no run_info.json; re-export it with util/export.py --format onnx")
        self.source = str(folder)
        self.preprocessing = self.info["preprocessing"]
        self.class_names = self.info.get("class_names")
        self.sessions = {p.stem: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                         for p in sorted(folder.glob("*.onnx"))}

    @property
    def has_classifier(self) -> bool:
        return "classifier" in self.sessions

    @property
    def num_classes(self) -> int:
        if self.has_segmenter:  # its output's class axis is symbolic after the dynamic-size resize
            return int(self.info["heads"]["seg_head"]["num_classes"])
        if self.fusion_task:
            return int(self.sessions["fusion"].get_outputs()[0].shape[1])
        return int(self.sessions["classifier"].get_outputs()[0].shape[1]) if self.has_classifier else 0

    @property
    def has_segmenter(self) -> bool:
        return "segmenter" in self.sessions

    @property
    def fusion_task(self) -> str | None:
        """"vqa" or "nlvr2" when the export holds a fused-pair classifier, else None."""
        if "fusion" not in self.sessions:
            return None
        return "nlvr2" if "nlvr2_head" in self.info.get("heads", {}) else "vqa"

    @property
    def has_itc(self) -> bool:
        return "image_embedding" in self.sessions and "text_embedding" in self.sessions

    @property
    def max_text_len(self) -> int:
        return int(self.info.get("max_text_len", 40))

    def to(self, device: torch.device) -> "OnnxServable":
        return self  # onnxruntime runs on the CPU here

    def text_tokenizer(self, override: str | None = None):
        from models.text_tokenizer import load_text_tokenizer

        if override:
            return load_text_tokenizer(override)
        record = self.info.get("text_tokenizer")
        return tokenizer_from_record(record) if record else None

    def _run(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        feeds = {k: v.cpu().numpy().astype(np.int64 if not v.is_floating_point() else np.float32) for k, v in inputs.items()}
        return torch.from_numpy(self.sessions[name].run(None, feeds)[0])

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("classifier", images=images)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("image_embedding", images=images)

    def fused_logits(self, images: list[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        names = ["images", "images_2"][:len(images)]
        return self._run("fusion", **dict(zip(names, images)), input_ids=input_ids, attention_mask=attention_mask)

    def segment_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("segmenter", images=images)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run("text_embedding", input_ids=input_ids, attention_mask=attention_mask)
