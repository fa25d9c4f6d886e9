"""What a checkpoint or export says about itself besides its weights, so that the file alone serves
fine-tuning, prediction, search and export: the heads it holds (specs), the image preprocessing
(size, crop, mean/std, interpolation), the text tokenizer (its name and its whole vocabulary),
`max_text_len`, the task and the class names. Stored as `run_info` (a plain dict in `.pth`, JSON in
safetensors metadata and beside exports)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from custom_datasets.transforms import mean_std


def preprocessing(image_size: int, crop_pct: float, imagenet_mean_std: bool, interpolation: str = "bicubic",
                  crop_mode: str = "center") -> dict:
    """The held-out view: resize the shorter side to image_size / crop_pct, centre-crop image_size,
    normalise; crop_mode "squash": the whole image resized to a square (image-text reasoning)."""
    mean, std = mean_std(imagenet_mean_std)
    return {"image_size": image_size, "crop_pct": crop_pct, "mean": list(mean), "std": list(std),
            "interpolation": interpolation, **({"crop_mode": crop_mode} if crop_mode != "center" else {})}


def text_tokenizer_record(tokenizer, name: str | None) -> dict[str, Any]:
    """The tokenizer's name and vocabulary (in id order), enough to rebuild it without its folder."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return {"name": name, "vocab": [token for token, _ in vocab],
            "lowercase": bool(getattr(tokenizer, "do_lower_case", True))}


def tokenizer_from_record(record: dict[str, Any]):
    """Rebuild the text tokenizer a checkpoint recorded (offline: from its embedded vocabulary)."""
    from models.text_tokenizer import load_text_tokenizer, write_tokenizer_folder

    with tempfile.TemporaryDirectory(prefix="cook-tokenizer-") as folder:  # read into memory, then removed
        write_tokenizer_folder(Path(folder), record["vocab"], record.get("lowercase", True))
        return load_text_tokenizer(folder)


def compact(**fields: Any) -> dict[str, Any]:
    """A run_info dict without the fields that are unknown (None)."""
    return {k: v for k, v in fields.items() if v is not None}


def export_info_path(path: Path) -> Path:
    """`run_info.json` in an export folder, `<name>.run_info.json` beside an exported file."""
    return path / "run_info.json" if path.is_dir() else path.with_suffix(".run_info.json")


def write_beside(path: Path, info: dict[str, Any]) -> Path:
    target = export_info_path(path)
    target.write_text(json.dumps(info, indent=1))
    return target


def read_beside(path: Path) -> dict[str, Any]:
    target = export_info_path(path)
    return json.loads(target.read_text()) if target.is_file() else {}
