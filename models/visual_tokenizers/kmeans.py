"""A visual tokenizer that needs no download: k-means centroids of small pixel patches, fitted on
the user's own images (satellite tiles, microscopy, anything DALL-E never saw)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def patch_vectors(images: torch.Tensor, grid: int) -> torch.Tensor:
    """`[B, C, S, S]` pixels in [0, 1] -> `[B, grid*grid, C*p*p]` flattened patches (p = S / grid)."""
    b, c, s, _ = images.shape
    p = s // grid
    x = F.unfold(images, kernel_size=p, stride=p)  # [B, C*p*p, grid*grid]
    return x.transpose(1, 2)


def nearest_centroid(vectors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the closest centroid (squared Euclidean) for each row of `[..., D]`."""
    flat = vectors.reshape(-1, vectors.shape[-1]).float()
    c = centroids.float()
    dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ c.t() + c.pow(2).sum(1)[None]  # [M, K]
    return dist.argmin(1).reshape(vectors.shape[:-1])


def fit_kmeans(vectors: torch.Tensor, k: int, iters: int = 25, seed: int = 0, on_iteration=None) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on `[M, D]` vectors; empty clusters are re-seeded
    from the points farthest from their centroid."""
    gen = torch.Generator().manual_seed(seed)
    x = vectors.float()
    if x.shape[0] < k:
        raise ValueError(f"need at least {k} patches to fit {k} clusters, got {x.shape[0]}")
    centroids = x[torch.randint(x.shape[0], (1,), generator=gen)]
    closest = (x - centroids[0]).pow(2).sum(1)
    for _ in range(1, k):  # k-means++
        pick = torch.multinomial(closest + 1e-12, 1, generator=gen)
        centroids = torch.cat([centroids, x[pick]])
        closest = torch.minimum(closest, (x - x[pick]).pow(2).sum(1))
    for iteration in range(iters):
        if on_iteration is not None:
            on_iteration(iteration)
        assign = nearest_centroid(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            err = (x - centroids[assign]).pow(2).sum(1)
            centroids[empty] = x[err.topk(int(empty.sum())).indices]
    return centroids


class KMeansTokenizer(nn.Module):
    """`get_codebook_indices([B, C, S, S] in [0, 1]) -> [B, grid*grid]` nearest-centroid ids."""

    def __init__(self, centroids: torch.Tensor, grid: int) -> None:
        super().__init__()
        self.register_buffer("centroids", centroids.float())
        self.grid = grid

    @property
    def vocab_size(self) -> int:
        return self.centroids.shape[0]

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        return nearest_centroid(patch_vectors(images.float(), self.grid), self.centroids)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, image_size: int) -> torch.Tensor:
        """`[B, grid*grid]` ids -> `[B, C, S, S]` pixels: each token drawn as its centroid patch (the
        tokenizer's own reconstruction, exact up to the clustering error)."""
        p = image_size // self.grid
        patches = self.centroids[ids]  # [B, grid*grid, C*p*p]
        return F.fold(patches.transpose(1, 2), (image_size, image_size), kernel_size=p, stride=p).clamp(0, 1)
