"""Image-text retrieval with the contrastive (ITC) head: embeddings of a held-out set of images and
all their captions, and recall@k in both directions (the COCO / Flickr30k protocol)."""
from __future__ import annotations

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


@torch.no_grad()
def pair_embeddings(backbone, head: nn.Module, dataset: Dataset, text_tokenizer, max_text_len: int, batch_size: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embeddings `[I, D]`, embeddings of every caption `[T, D]`, image index of each caption `[T]`)."""
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
        n_images += len(samples)
    return torch.cat(image_emb), torch.cat(text_emb), torch.tensor(owner, device=device)


