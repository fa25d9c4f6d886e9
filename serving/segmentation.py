"""Segmenting image files with a servable (a checkpoint or its ONNX export): the held-out view the
run evaluated with (the image at its base scale), the inference it recorded (sliding window by
default), probabilities at the file's own size; each result written as a palette PNG whose pixel
values are the class indices (so it is both a picture and a label map) and as an overlay."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from custom_datasets.segmentation_transforms import SegmentationView
from models.segmentation_inference import segment_probabilities
from visualization.segmentation_pictures import colour_mask, overlay, palette


def inference_settings(servable) -> tuple[int, str, int | None]:
    """(crop, mode, stride) the run recorded."""
    recorded = servable.info.get("segmentation_inference") or {}
    return int(servable.preprocessing["image_size"]), recorded.get("mode", "slide"), recorded.get("stride")


def segment_image(servable, image: Image.Image) -> torch.Tensor:
    """`[classes, H, W]` probabilities of one RGB image at its own size."""
    crop, mode, stride = inference_settings(servable)
    imagenet = list(servable.preprocessing.get("mean", [])) != [0.5, 0.5, 0.5]
    view = SegmentationView(crop, train=False, imagenet_mean_std=imagenet)
    scaled = view(image, np.zeros((image.height, image.width), dtype=np.int64))["image"]
    with torch.no_grad():
        return segment_probabilities(servable.segment_logits, scaled[None], crop, mode, stride,
                                     out_size=(image.height, image.width))[0]


def write_mask(image: Image.Image, classes: torch.Tensor, num_classes: int, stem: Path) -> dict[str, str]:
    """`<stem>_mask.png` (palette PNG: values are class indices) and `<stem>_overlay.png`."""
    indices = classes.numpy().astype(np.uint8 if num_classes <= 256 else np.int32)
    mask_path, overlay_path = stem.parent / f"{stem.name}_mask.png", stem.parent / f"{stem.name}_overlay.png"
    if num_classes <= 256:
        mask = Image.fromarray(indices)
        mask.putpalette(palette(num_classes).reshape(-1).tolist())
        mask.save(mask_path)
    else:  # more classes than a palette holds: a 32-bit label map
        Image.fromarray(indices).save(mask_path)
    overlay(image, colour_mask(classes, num_classes)).save(overlay_path)
    return {"mask": str(mask_path), "overlay": str(overlay_path)}


def class_shares(classes: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Fraction of the image each predicted class covers, largest first."""
    counts = torch.bincount(classes.flatten(), minlength=len(names)).double() / classes.numel()
    order = counts.argsort(descending=True)
    return {names[int(i)]: round(float(counts[i]), 4) for i in order if counts[i] > 0}


def predict_masks(servable, files: list[Path], names: list[str], out_dir: Path, read) -> tuple[dict, dict]:
    """({path: {"mask", "overlay", "classes"}}, {path: error}) for every file; `read(path)` opens
    an image (unreadable files are reported, not fatal)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for index, path in enumerate(files):
        try:
            image = read(path)
        except Exception as err:  # noqa: BLE001 - unreadable files are reported, not fatal
            failed[str(path)] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"{path}: unreadable ({failed[str(path)]})")
            continue
        classes = segment_image(servable, image).argmax(0)
        written = write_mask(image, classes, len(names), out_dir / f"{index:05d}_{Path(path).stem}")
        results[str(path)] = {**written, "classes": class_shares(classes, names)}
        print(f"{path}: {', '.join(f'{k} {v:.0%}' for k, v in list(results[str(path)]['classes'].items())[:3])}")
    return results, failed
