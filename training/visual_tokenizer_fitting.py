"""Fit a k-means visual tokenizer on the tokenizer views of a dataset."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from common.checkpoint_io import atomic_write
from common.console import say
from common.metrics import ProgressPrinter
from custom_datasets.collate import collate_skipping_bad
from models.visual_tokenizers import kmeans_metadata
from models.visual_tokenizers.kmeans import KMeansTokenizer, fit_kmeans, patch_vectors

LLOYD_ITERATIONS = 25


def fit_kmeans_tokenizer(dataset: Dataset, grid: int, vocab_size: int, max_images: int = 2000,
                         max_patches: int = 200_000, seed: int = 0, num_workers: int = 0) -> KMeansTokenizer:
    """Collect `tokenizer_image` patches from up to `max_images` samples and cluster them."""
    gen = torch.Generator().manual_seed(seed)
    count = min(max_images, len(dataset))
    subset = torch.utils.data.Subset(dataset, torch.randperm(len(dataset), generator=gen)[:count].tolist())
    loader = DataLoader(subset, batch_size=64, num_workers=num_workers, collate_fn=collate_skipping_bad)
    chunks = []
    progress = ProgressPrinter("k-means: reading images", len(loader), every=max(1, len(loader) // 5))
    for step, batch in enumerate(loader):
        if "tokenizer_image" in batch:
            chunks.append(patch_vectors(batch["tokenizer_image"], grid).flatten(0, 1))  # [B*G, D]
        progress.step(step, len(batch.get("tokenizer_image", [])), {})
    if not chunks:
        raise ValueError("no readable images to fit the visual tokenizer on")
    vectors = torch.cat(chunks)
    if vectors.shape[0] > max_patches:
        vectors = vectors[torch.randperm(vectors.shape[0], generator=gen)[:max_patches]]
    say(f"k-means: clustering {vectors.shape[0]} patches into {vocab_size} tokens ...")
    iterations = ProgressPrinter("k-means: Lloyd iterations", LLOYD_ITERATIONS, every=5)
    centroids = fit_kmeans(vectors, vocab_size, iters=LLOYD_ITERATIONS, seed=seed,
                           on_iteration=lambda i: iterations.step(i, 0, {}))
    return KMeansTokenizer(centroids, grid)


def save_kmeans_tokenizer(tokenizer: KMeansTokenizer, path: str | Path, image_size: int) -> None:
    from safetensors.torch import save_file

    meta = kmeans_metadata(tokenizer.grid, image_size)
    atomic_write(Path(path), lambda tmp: save_file({"centroids": tokenizer.centroids.contiguous().cpu()}, tmp, metadata=meta))
