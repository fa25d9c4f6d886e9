"""Fit a k-means visual tokenizer on the tokenizer views of a dataset."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from common.checkpoint_io import save_safetensors
from common.console import say
from common.errors import UserError
from common.metrics import ProgressPrinter
from custom_datasets.collate import collate_skipping_bad
from models.visual_tokenizers import kmeans_metadata
from models.visual_tokenizers.kmeans import KMeansTokenizer, fit_kmeans, patch_vectors

LLOYD_ITERATIONS = 25


def fit_kmeans_tokenizer(dataset: Dataset, grid: int, vocab_size: int, max_images: int = 2000,
                         max_patches: int = 200_000, seed: int = 0, num_workers: int = 0,
                         vocab_flag: str = "--visual_vocab_size") -> KMeansTokenizer:
    """Collect `tokenizer_image` patches from up to `max_images` samples and cluster them;
    `vocab_flag` names the token count in the sentence when there are fewer patches than tokens."""
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
        raise UserError(f"none of the {count} images read to fit the visual tokenizer on could be read; check the data")
    vectors = torch.cat(chunks)
    if vectors.shape[0] < vocab_size:
        raise UserError(f"the {count} images read give {vectors.shape[0]} patches ({grid}x{grid} each), fewer than the "
                        f"{vocab_size} visual tokens asked for: lower {vocab_flag} to at most {vectors.shape[0]}, or fit "
                        f"on more images")
    if vectors.shape[0] > max_patches:
        vectors = vectors[torch.randperm(vectors.shape[0], generator=gen)[:max_patches]]
    say(f"k-means: clustering {vectors.shape[0]} patches into {vocab_size} tokens ...")
    iterations = ProgressPrinter("k-means: Lloyd iterations", LLOYD_ITERATIONS, every=5)
    centroids = fit_kmeans(vectors, vocab_size, iters=LLOYD_ITERATIONS, seed=seed,
                           on_iteration=lambda i: iterations.step(i, 0, {}))
    return KMeansTokenizer(centroids, grid)


def save_kmeans_tokenizer(tokenizer: KMeansTokenizer, path: str | Path, image_size: int) -> None:
    save_safetensors(path, {"centroids": tokenizer.centroids}, kmeans_metadata(tokenizer.grid, image_size))
