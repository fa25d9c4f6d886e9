"""The registry of pretraining modes (`--exp_name`). Adding a mode is one file and one entry here."""
from __future__ import annotations

from models.modes.base import ModeOptions, PretrainMode
from models.modes.compound_pretrain import CompoundPretrain
from models.modes.image_mae import ImageMAE
from models.modes.image_mim import ImageMIM
from models.modes.image_text_itc import ImageTextITC
from models.modes.image_text_itm import ImageTextITM
from models.modes.image_text_mlm import ImageTextMLM
from models.modes.text_mlm import TextMLM

PRETRAIN_MODES: dict[str, type[PretrainMode]] = {
    mode.name: mode for mode in (ImageMIM, ImageMAE, TextMLM, ImageTextITC, ImageTextITM, ImageTextMLM,
                                 CompoundPretrain)
}

# ContinualTransformer's mode names: (the mode, what the name adds)
MODE_ALIASES: dict[str, tuple[str, str]] = {
    "image_text_itc_fullmodel": ("image_text_itc", "image_text_itc training the whole model (no LoRA)"),
    "image_text_itc_loraA": ("image_text_itc", "image_text_itc training only the LoRA A factors"),
}

__all__ = ["MODE_ALIASES", "PRETRAIN_MODES", "PretrainMode", "ModeOptions", "ImageMIM", "ImageMAE", "TextMLM",
           "ImageTextITC", "ImageTextITM", "ImageTextMLM", "CompoundPretrain"]
