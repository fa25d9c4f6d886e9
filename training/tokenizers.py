"""The two tokenizers of a run: the text tokenizer (BERT WordPiece) and the visual tokenizer that
makes MIM targets (DALL-E, or k-means fitted on the run's own training images when none is given)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from common import distributed as dist_util
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
    return load_text_tokenizer(cfg.text.tokenizer), cfg


def fitted_tokenizer_path(cfg: PretrainConfig) -> Path:
    return Path(cfg.run.output_dir) / "visual_tokenizer.safetensors"


def fit_run_tokenizer(cfg: PretrainConfig, train_set: Dataset, grid: int, path: Path) -> None:
    """Fit the k-means tokenizer on the run's training images (main process; others wait)."""
    tok = cfg.visual_tokenizer
    if dist_util.is_main_process() and not path.exists():
        print(f"fitting a {tok.visual_vocab_size}-token k-means visual tokenizer on up to "
              f"{tok.tokenizer_fit_images} training images ...", flush=True)
        start = time.time()
        tokenizer = fit_kmeans_tokenizer(train_set, grid, tok.visual_vocab_size, tok.tokenizer_fit_images,
                                         seed=cfg.run.seed, num_workers=cfg.data.num_workers)
        save_kmeans_tokenizer(tokenizer, path, tok.second_image_size)
        print(f"saved {path} ({time.time() - start:.0f}s)", flush=True)
    dist_util.barrier()


def build_visual_tokenizer(cfg: PretrainConfig, train_set: Dataset, grid: int, device: torch.device):
    """(tokenizer on `device`, config naming its weights). A k-means run without weights fits them."""
    tok = cfg.visual_tokenizer
    if tok.d_vae_type == "kmeans" and tok.d_vae_weight_path is None:
        path = fitted_tokenizer_path(cfg)
        fit_run_tokenizer(cfg, train_set, grid, path)
        cfg = replace(cfg, visual_tokenizer={"d_vae_weight_path": str(path)})
    tokenizer = create_visual_tokenizer(tok.d_vae_type, cfg.visual_tokenizer.d_vae_weight_path, tok.second_image_size,
                                        expected_grid=grid)
    return tokenizer.to(device), cfg
