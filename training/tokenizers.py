"""The two tokenizers of a run: the text tokenizer (BERT WordPiece) and the visual tokenizer that
makes MIM targets (DALL-E, or k-means fitted on the run's own training images when none is given)."""
from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common import distributed as dist_util
from common.console import say
from common.errors import UserError
from models.text_tokenizer import load_text_tokenizer
from models.visual_tokenizers import create_visual_tokenizer
from training.config import PretrainConfig, replace
from training.visual_tokenizer_fitting import fit_kmeans_tokenizer, save_kmeans_tokenizer

DEFAULT_TEXT_TOKENIZER = "bert-base-uncased"


def build_text_tokenizer(cfg: PretrainConfig):
    """(tokenizer or None for image-only runs, config naming the tokenizer used)."""
    if cfg.mode.data_kind == "image" and cfg.text.tokenizer is None:
        return None, cfg
    cfg = replace(cfg, text={"tokenizer": cfg.text.tokenizer or DEFAULT_TEXT_TOKENIZER})
    tokenizer = load_text_tokenizer(cfg.text.tokenizer)
    if cfg.text.vocab_size is not None and cfg.text.vocab_size != len(tokenizer):
        raise UserError(f"--vocab_size {cfg.text.vocab_size} but --tokenizer {cfg.text.tokenizer} has {len(tokenizer)} "
                        f"tokens; the tokenizer decides the text vocabulary: drop --vocab_size or pass the tokenizer "
                        f"with {cfg.text.vocab_size} tokens")
    return tokenizer, cfg


@contextlib.contextmanager
def separate_rng():
    """Run a block on its own random streams: Python's, numpy's and torch's states come back as
    they were, so what follows (the model's initialisation) does not depend on the block."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def fitted_tokenizer_path(cfg: PretrainConfig) -> Path:
    return Path(cfg.run.output_dir) / "visual_tokenizer.safetensors"


def fit_run_tokenizer(cfg: PretrainConfig, train_set: Dataset, grid: int, path: Path) -> None:
    """Fit the k-means tokenizer on the run's training images (main process; others wait)."""
    if dist_util.is_main_process() and not path.exists():
        with separate_rng():  # the model's initialisation must not depend on whether a fit happened
            _fit_and_save(cfg, train_set, grid, path)
    dist_util.barrier()


def _fit_and_save(cfg: PretrainConfig, train_set: Dataset, grid: int, path: Path) -> None:
    tok = cfg.visual_tokenizer
    say(f"fitting a {tok.visual_vocab_size}-token k-means visual tokenizer on up to {tok.tokenizer_fit_images} "
        f"training images ...")
    start = time.time()
    tokenizer = fit_kmeans_tokenizer(train_set, grid, tok.visual_vocab_size, tok.tokenizer_fit_images,
                                     seed=cfg.run.seed, num_workers=cfg.data.num_workers)
    save_kmeans_tokenizer(tokenizer, path, tok.second_image_size)
    say(f"saved {path} ({time.time() - start:.0f}s)")


def build_visual_tokenizer(cfg: PretrainConfig, train_set: Dataset, grid: int, device: torch.device,
                           carried_dall_e: dict[str, dict[str, torch.Tensor]] | None = None):
    """(tokenizer on `device`, config naming its weights). A k-means run without weights fits them;
    a DALL-E run without weights uses the encoder (and, for pictures, the decoder) a
    ContinualTransformer checkpoint carries: exactly the tokenizer that run trained with."""
    tok = cfg.visual_tokenizer
    if tok.d_vae_type == "kmeans" and tok.d_vae_weight_path is None:
        path = fitted_tokenizer_path(cfg)
        fit_run_tokenizer(cfg, train_set, grid, path)
        cfg = replace(cfg, visual_tokenizer={"d_vae_weight_path": str(path)})
    if tok.d_vae_type == "dall-e" and tok.d_vae_weight_path is None:
        if not (carried_dall_e or {}).get("encoder"):
            raise UserError("--d_vae_type dall-e needs --d_vae_weight_path DIR holding OpenAI's encoder.pkl (no "
                            "checkpoint this run starts from carries one)")
        parts = " and decoder" if carried_dall_e.get("decoder") else ""
        say(f"visual tokenizer: the DALL-E encoder{parts} carried by the checkpoint (its mim_processor.d_vae: the "
            f"tokenizer that run trained with)")
    tokenizer = create_visual_tokenizer(tok.d_vae_type, cfg.visual_tokenizer.d_vae_weight_path, tok.second_image_size,
                                        expected_grid=grid, carried_dall_e=carried_dall_e)
    if tok.visual_vocab_size is not None and tok.d_vae_type in ("dall-e", "vqkd") \
            and tokenizer.vocab_size != tok.visual_vocab_size:
        what = "DALL-E encoder" if tok.d_vae_type == "dall-e" else "VQ-KD codebook"
        raise UserError(f"--img_vocab_size {tok.visual_vocab_size} but the {what} has {tokenizer.vocab_size} "
                        f"tokens; drop the flag or pass the matching tokenizer")
    return tokenizer.to(device), cfg
