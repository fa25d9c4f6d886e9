"""Defaults of other code bases, given by one flag (`--preset continual_transformer`): the values a
ContinualTransformer user's commands assume. Explicit flags and `--config` still win. docs/continual_transformer.md's
table "Defaults" is this dict."""
from __future__ import annotations

from typing import Any

CONTINUAL_TRANSFORMER: dict[str, Any] = {
    "exp_name": "text_mlm", "model": "vlmo_base_patch16", "epochs": 400, "batch_size": 64, "blr": 1e-3, "min_lr": 0.0,
    "warmup_epochs": 40, "weight_decay": 0.05, "opt_betas": [0.9, 0.95], "clip_grad": None, "num_workers": 10,
    "save_per_epochs": 20, "save_epochs_from_zero": True, "drop_path": 0.1, "image_size": 224,
    "second_image_size": 112, "imagenet_default_mean_and_std": True, "d_vae_type": "dall-e",
    "d_vae_weight_path": "checkpoints/dall_e_tokenizer_weight", "mask_strategy": "random",
    "mim_probability": 0.55, "max_text_len": 196, "max_text_len_of_initckpt": 196, "tokenizer": "bert-base-uncased",
    "lora_alpha": 1.0, "reg_delta": "unscaled", "gpu_amp": "fp16",
}

PRESETS: dict[str, dict[str, Any]] = {"continual_transformer": CONTINUAL_TRANSFORMER}
