"""From the flags as given to the settings a pretraining run uses: defaults that depend on other
flags (the mode, the device, files on disk), and ContinualTransformer's spellings of ours (mode
names, `--data_path` holding a caption file, `--disable_*` flags). Each decision that is not
obvious from the command line is said once, at start."""
from __future__ import annotations

from pathlib import Path

from common.console import say
from common.errors import UserError
from custom_datasets.settings import SYNTHETIC
from custom_datasets.text_data import TEXT_FORMATS
from models.modes import MODE_ALIASES

DEFAULT_VISUAL_VOCAB = 256  # k-means clusters when a run fits its own tokenizer


def mode_alias(exp_name: str, lora_rank: int) -> tuple[str, dict]:
    """(the mode, LoRA settings the alias implies)."""
    if exp_name not in MODE_ALIASES:
        return exp_name, {}
    mode, _ = MODE_ALIASES[exp_name]
    if exp_name.endswith("_fullmodel"):
        if lora_rank:
            raise UserError(f"--exp_name {exp_name} trains the whole model; drop --lora_rank {lora_rank}")
        return mode, {}
    return mode, {"lora_trainable": "A"}


def caption_file_as_data_path(exp_name: str, data_kind: str, data_path: str | None,
                              data_file_path: tuple[str, ...] | None) -> tuple[str | None, tuple[str, ...] | None]:
    """ContinualTransformer passes the caption file of a text mode as --data_path."""
    if data_kind == "text" and not data_file_path and data_path and data_path != SYNTHETIC \
            and Path(data_path).suffix.lower() in TEXT_FORMATS:
        say(f"{exp_name}: --data_path {data_path} is a caption file: reading it as --data_file_path")
        return None, (data_path,)
    return data_path, data_file_path


def require_data(exp_name: str, data_kind: str, data_path: str | None, data_file_path, webdataset: bool) -> None:
    """A run never falls back to the embedded synthetic world without being asked for it."""
    if data_path or data_file_path or webdataset:
        return
    need = {"image": "--data_path IMAGE_FOLDER", "text": "--data_file_path CAPTIONS.json (or --data_path CAPTIONS.json)",
            "pair": "--data_file_path PAIRS.json with --data_path IMAGE_ROOT, or --webdataset"}[data_kind]
    raise UserError(f"--exp_name {exp_name} needs data: pass {need}, or --data_path synthetic to train on the "
                    f"embedded synthetic world")


def visual_tokenizer_choice(d_vae_type: str | None, path: str | None, folder: str, vocab: int | None,
                            needed: bool) -> tuple[str, str | None, int | None]:
    """(kind, weights, vocabulary): DALL-E from `folder` when it holds OpenAI's encoder (where
    ContinualTransformer keeps it), else a k-means tokenizer fitted on the run's images."""
    if d_vae_type is None:
        found = any((Path(folder) / name).is_file() for name in ("encoder.pkl", "encoder.safetensors"))
        d_vae_type = "dall-e" if found and not path else "kmeans"
        if needed and found and not path:
            say(f"visual tokenizer: the DALL-E encoder in {folder}/ (pass --d_vae_type kmeans to fit one instead)")
    if d_vae_type == "dall-e" and not path and Path(folder).is_dir():
        path = folder
    # a DALL-E encoder or a VQ-KD codebook knows its vocabulary (a given --img_vocab_size is checked against it)
    known = vocab is not None or d_vae_type in ("dall-e", "vqkd")
    return d_vae_type, path, vocab if known else DEFAULT_VISUAL_VOCAB


def lora_factors(lora_trainable: str | None, preset: str | None, exp_name: str) -> str:
    """ContinualTransformer trains both factors for text but only B for image-text stages."""
    if lora_trainable:
        return lora_trainable
    if preset == "continual_transformer" and exp_name in ("image_text_itc", "compound_pretrain"):
        return "B"
    return "both"


def continual_method(cl_method: str | None, self_regularization: bool, lora_rank: int) -> str:
    """--cl_method, or what the LoRA flags imply (as before the flag existed)."""
    from training.continual import default_method

    if cl_method is not None and self_regularization and cl_method != "self_reg":
        raise UserError(f"--self_regularization is --cl_method self_reg; drop one of it and --cl_method {cl_method}")
    return cl_method or default_method(self_regularization, lora_rank)
