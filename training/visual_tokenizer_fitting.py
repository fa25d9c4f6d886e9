"""Fit a k-means visual tokenizer on the tokenizer views of a dataset."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from common.checkpoint_io import atomic_write
from custom_datasets.collate import collate_skipping_bad
from models.visual_tokenizers import kmeans_metadata
from models.visual_tokenizers.kmeans import KMeansTokenizer, fit_kmeans, patch_vectors

log = logging.getLogger(__name__)


def fit_kmeans_tokenizer(dataset: Dataset, grid: int, vocab_size: int, max_images: int = 2000,
                         max_patches: int = 200_000, seed: int = 0, num_workers: int = 0) -> KMeansTokenizer:
    """Collect `tokenizer_image` patches from up to `max_images` samples and cluster them."""
    gen = torch.Generator().manual_seed(seed)
    count = min(max_images, len(dataset))
    subset = torch.utils.data.Subset(dataset, torch.randperm(len(dataset), generator=gen)[:count].tolist())
    loader = DataLoader(subset, batch_size=64, num_workers=num_workers, collate_fn=collate_skipping_bad)
    chunks = []
    for batch in loader:
        if "tokenizer_image" in batch:
            chunks.append(patch_vectors(batch["tokenizer_image"], grid).flatten(0, 1))  # [B*G, D]
    if not chunks:
        raise ValueError("no readable images to fit the visual tokenizer on")
    vectors = torch.cat(chunks)
    if vectors.shape[0] > max_patches:
        vectors = vectors[torch.randperm(vectors.shape[0], generator=gen)[:max_patches]]
    log.info("fitting %d k-means clusters on %d patches", vocab_size, vectors.shape[0])
    return KMeansTokenizer(fit_kmeans(vectors, vocab_size, seed=seed), grid)


def save_kmeans_tokenizer(tokenizer: KMeansTokenizer, path: str | Path, image_size: int) -> None:
    from safetensors.torch import save_file

    meta = kmeans_metadata(tokenizer.grid, image_size)
    atomic_write(Path(path), lambda tmp: save_file({"centroids": tokenizer.centroids.contiguous().cpu()}, tmp, metadata=meta))
