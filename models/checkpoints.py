"""Reading a model checkpoint of any origin in this project's layout: files of this project as
they are, ContinualTransformer's and MAE's (facebookresearch/mae, timm, Hugging Face ViTMAE folders)
translated on the fly (`models/continual_transformer.py`, `models/mae_weights.py`)."""
from __future__ import annotations

import os
from pathlib import Path

from common.checkpoint_io import Checkpoint, read_checkpoint
from models import mae_weights
from models.continual_transformer import is_continual_transformer, translate


def read_model_checkpoint(path: str | os.PathLike) -> Checkpoint:
    if mae_weights.is_hf_vit_folder(Path(path)):
        return mae_weights.read_hf_folder(Path(path))
    ckpt = read_checkpoint(path)
    if is_continual_transformer(ckpt):
        return translate(ckpt)
    return mae_weights.translate(ckpt) if mae_weights.is_mae(ckpt) else ckpt
