"""Image-text retrieval with the contrastive (ITC) head: embeddings of a held-out set of images and
all their captions, and recall@k in both directions (the COCO / Flickr30k protocol)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.metrics import with_progress
from custom_datasets import batch as B
from custom_datasets.text_collate import tokenize_captions


def recall_at_k(similarity: torch.Tensor, text_to_image: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """`similarity` [images, texts]; `text_to_image[j]` is the image of caption j. An image counts as
    retrieved-correctly at k when any of its captions is in its top k (COCO/Flickr30k protocol)."""
    out = {}
    n_images = similarity.shape[0]
    for k in ks:
        top_texts = similarity.topk(min(k, similarity.shape[1]), dim=1).indices  # [I, k]
        hits = (text_to_image[top_texts] == torch.arange(n_images, device=similarity.device)[:, None]).any(1)
        out[f"itc_i2t_r{k}"] = hits.float().mean().item()
        top_images = similarity.t().topk(min(k, n_images), dim=1).indices  # [T, k]
        out[f"itc_t2i_r{k}"] = (top_images == text_to_image[:, None]).any(1).float().mean().item()
    return out


def trivial_recall_note(n_images: int, n_texts: int, ks=(1, 5, 10)) -> str | None:
    """A sentence when some R@k is 1 by construction: k reaches the number of candidates, so every
    candidate, the right one too, is in the top k."""
    trivial = [k for k in ks if k >= n_images or k >= n_texts]
    if not trivial:
        return None
    return (f"only {n_images} held-out images and {n_texts} captions: R@{'/'.join(map(str, trivial))} count every "
            f"candidate as retrieved and mean nothing (1.000 for a random model); hold out more than {max(ks)} pairs")


@dataclass
class PairInputs:
    """The held-out inputs re-ranking feeds the fused forward, kept while they are embedded (so the
    images are decoded once): every image `[I, 3, H, W]` on the CPU, every caption's ids and mask
    `[T, L]` padded to one length."""
    images: list[torch.Tensor] = field(default_factory=list)
    ids: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)

    def add(self, image: torch.Tensor, captions: list[str], text_tokenizer, max_text_len: int) -> None:
        self.images.append(image)
        enc = text_tokenizer(captions, padding="max_length", truncation=True, max_length=max_text_len,
                             return_tensors="pt")  # one length for all, so they stack
        self.ids.append(enc["input_ids"])
        self.masks.append(enc["attention_mask"])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.stack(self.images), torch.cat(self.ids), torch.cat(self.masks)


@torch.no_grad()
def pair_embeddings(backbone, head: nn.Module, dataset: Dataset, text_tokenizer, max_text_len: int, batch_size: int,
                    device: torch.device, keep: PairInputs | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embeddings `[I, D]`, embeddings of every caption `[T, D]`, image index of each caption
    `[T]`); with `keep`, the inputs are collected into it in the same order."""
    image_emb, text_emb, owner, n_images = [], [], [], 0
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=lambda s: [x for x in s if x is not None])
    for samples in with_progress(loader, "retrieval: embedding images and captions"):
        if not samples:
            continue
        images = torch.stack([s[B.IMAGE] for s in samples]).to(device)
        image_emb.append(head.embed_image(backbone.encode_image(images)[:, 0]))
        for i, s in enumerate(samples):
            captions = [s[B.CAPTION]] if isinstance(s[B.CAPTION], str) else list(s[B.CAPTION])
            enc = tokenize_captions(text_tokenizer, captions, max_text_len)
            cls = backbone.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device))[:, 0]
            text_emb.append(head.embed_text(cls))
            owner += [n_images + i] * len(captions)
            if keep is not None:
                keep.add(s[B.IMAGE], captions, text_tokenizer, max_text_len)
        n_images += len(samples)
    return torch.cat(image_emb), torch.cat(text_emb), torch.tensor(owner, device=device)


def reranked(similarity: torch.Tensor, k: int, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-ranking of the contrastive shortlist (VLMo): each image's top `k` captions and each
    caption's top `k` images by `similarity` [I, T] are re-ordered by `score(image_idx, text_idx)`
    (the matching head) and stay ahead of everything outside the shortlist, which keeps its order.
    Returns (the image-to-text matrix, the text-to-image matrix), each ready for `recall_at_k`."""
    lift = similarity.abs().max() * 2 + 1  # above any contrastive similarity
    out = []
    for matrix in (similarity, similarity.t()):  # rows: the queries of one direction
        top = matrix.topk(min(k, matrix.shape[1]), dim=1).indices  # [Q, k]
        queries = torch.arange(matrix.shape[0], device=matrix.device)[:, None].expand_as(top)
        pairs = (queries.reshape(-1), top.reshape(-1))
        if matrix is not similarity:  # text queries: (image, text) = (candidate, query)
            pairs = pairs[::-1]
        scores = torch.cat([score(i, t) for i, t in zip(pairs[0].split(batch_size), pairs[1].split(batch_size))])
        result = matrix.clone()
        result.scatter_(1, top, lift + torch.sigmoid(scores.view(top.shape).to(matrix.dtype)))
        out.append(result)
    return out[0], out[1].t()


def reranked_recalls(similarity: torch.Tensor, text_to_image: torch.Tensor, k: int,
                     score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Recall@1/5/10 both ways after re-ranking each shortlist of `k` (`rerank_*` keys)."""
    i2t, t2i = reranked(similarity, k, score)
    forward, backward = recall_at_k(i2t, text_to_image), recall_at_k(t2i, text_to_image)
    return {**{f"rerank_{key[4:]}": v for key, v in forward.items() if "_i2t_" in key},
            **{f"rerank_{key[4:]}": v for key, v in backward.items() if "_t2i_" in key}}
