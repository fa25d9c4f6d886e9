"""The registry of pretraining modes (`--exp_name`). Adding a mode is one file and one entry here."""
from __future__ import annotations

from models.tasks.base import PretrainTask, TaskOptions
from models.tasks.compound_pretrain import CompoundPretrain
from models.tasks.image_mim import ImageMIM
from models.tasks.image_text_itc import ImageTextITC
from models.tasks.text_mlm import TextMLM

TASKS: dict[str, type[PretrainTask]] = {
    task.name: task for task in (ImageMIM, TextMLM, ImageTextITC, CompoundPretrain)
}

__all__ = ["TASKS", "PretrainTask", "TaskOptions", "ImageMIM", "TextMLM", "ImageTextITC", "CompoundPretrain"]
