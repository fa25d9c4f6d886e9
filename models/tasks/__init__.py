"""The registry of pretraining modes (`--exp_name`). Adding a mode is one file and one entry here."""
from __future__ import annotations

from models.tasks.base import PretrainTask
from models.tasks.image_mim import ImageMIM

TASKS: dict[str, type[PretrainTask]] = {
    ImageMIM.name: ImageMIM,
}

__all__ = ["TASKS", "PretrainTask", "ImageMIM"]
