"""Reading a model checkpoint of any origin in this project's layout: files of this project as
they are, ContinualTransformer's translated on the fly (`models/continual_transformer.py`)."""
from __future__ import annotations

import os

from common.checkpoint_io import Checkpoint, read_checkpoint
from models.continual_transformer import is_continual_transformer, translate


def read_model_checkpoint(path: str | os.PathLike) -> Checkpoint:
    ckpt = read_checkpoint(path)
    return translate(ckpt) if is_continual_transformer(ckpt) else ckpt
