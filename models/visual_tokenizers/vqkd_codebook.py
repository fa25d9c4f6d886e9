"""How a VQ-KD codebook learns, as BEiT v2's NormEMAVectorQuantizer does it: codes initialised by
cosine k-means on the first batch's vectors (seeded k-means++-style here), then moved by an exponential moving average of the
(l2-normalised) mean of the vectors assigned to them, renormalised. Added here: dead-code restarts
(a code whose usage EMA falls below a floor takes a random vector of the batch), which BEiT v2's
training leaves to the k-means start. With several processes the counts and sums are added over all
of them first, so every process keeps the same codebook."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common import distributed as dist_util
from models.visual_tokenizers.vqkd import NormEmaQuantizer


def cosine_kmeans(samples: torch.Tensor, k: int, iters: int = 10, gen: torch.Generator | None = None) -> torch.Tensor:
    """`[M, d]` unit vectors -> `[k, d]` unit means (spherical k-means; a cluster left empty keeps
    its previous mean). Seeded k-means++-style, each next seed drawn in proportion to its cosine
    distance from the nearest seed so far (BEiT v2 draws them uniformly, which often starts two
    codes in one cluster and leaves another without); fewer samples than codes repeat some."""
    m = samples.shape[0]
    picks = [int(torch.randint(0, m, (1,), generator=gen))]
    nearest = 1 - samples @ samples[picks[0]]
    for _ in range(1, k):
        weights = nearest.clamp_min(0).cpu() + 1e-12
        picks.append(int(torch.multinomial(weights, 1, generator=gen)))
        nearest = torch.minimum(nearest, 1 - samples @ samples[picks[-1]])
    means = samples[torch.tensor(picks, device=samples.device)]
    for _ in range(iters):
        buckets = (samples @ means.t()).argmax(1)
        counts = torch.bincount(buckets, minlength=k)
        sums = torch.zeros_like(means).index_add_(0, buckets, samples)
        new = F.normalize(sums / counts.clamp_min(1)[:, None], dim=-1)
        means = torch.where((counts == 0)[:, None], means, new)
    return means


@torch.no_grad()
def kmeans_init_(quantizer: NormEmaQuantizer, z: torch.Tensor, gen: torch.Generator | None = None) -> bool:
    """The codes from k-means of rank 0's `[M, d]` vectors (then every rank's), once; True when it ran."""
    emb = quantizer.embedding
    if bool(emb.initted.item()):
        return False
    means = cosine_kmeans(F.normalize(z.float(), dim=-1), emb.weight.shape[0], gen=gen)
    emb.weight.copy_(means)
    emb.embed_avg.copy_(means)
    dist_util.broadcast_from_main([emb.weight, emb.embed_avg])
    emb.initted.fill_(1.0)
    return True


@torch.no_grad()
def ema_update_(quantizer: NormEmaQuantizer, z: torch.Tensor, ids: torch.Tensor, decay: float) -> torch.Tensor:
    """One EMA step from `[M, d]` vectors and their `[M]` codes; returns the step's (all-rank) counts."""
    emb, k = quantizer.embedding, quantizer.embedding.weight.shape[0]
    z = F.normalize(z.float(), dim=-1)
    counts = dist_util.all_reduce_sum(torch.bincount(ids, minlength=k).float())
    sums = dist_util.all_reduce_sum(torch.zeros_like(emb.weight).index_add_(0, ids, z))
    quantizer.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)  # usage statistics
    emb.cluster_size.copy_(quantizer.cluster_size)
    means = F.normalize(sums / counts.clamp_min(1)[:, None], dim=-1)
    means = torch.where((counts == 0)[:, None], emb.weight, means)  # an unused code stays where it is
    emb.weight.mul_(decay).add_(means, alpha=1 - decay)
    emb.weight.copy_(F.normalize(emb.weight, dim=-1))
    emb.embed_avg.copy_(emb.weight)
    return counts


@torch.no_grad()
def restart_dead_codes_(quantizer: NormEmaQuantizer, z: torch.Tensor, min_usage: float,
                        gen: torch.Generator | None = None) -> int:
    """Codes whose usage EMA is below `min_usage` take random vectors of rank 0's batch (the same on
    every rank) and a fresh usage of `min_usage`; returns how many were restarted."""
    emb = quantizer.embedding
    dead = quantizer.cluster_size < min_usage
    count = int(dead.sum())
    if count == 0 or z.shape[0] == 0:
        return 0
    picks = torch.randint(0, z.shape[0], (count,), generator=gen).to(z.device)
    fresh = F.normalize(z.float()[picks], dim=-1)
    dist_util.broadcast_from_main([fresh])
    emb.weight[dead] = fresh
    emb.embed_avg[dead] = fresh
    quantizer.cluster_size[dead] = min_usage
    return count


def usage_and_perplexity(counts: torch.Tensor) -> tuple[float, float]:
    """(share of codes used at least once, perplexity exp(H) of the code distribution) of `[K]` counts."""
    total = float(counts.sum())
    if total == 0:
        return 0.0, 0.0
    p = counts.float() / total
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    return float((counts > 0).float().mean()), math.exp(entropy)
