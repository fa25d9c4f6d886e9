"""What a stage kept and what it learned, measured on held-out data after every stage (and by
`--eval`): image MIM accuracy and leave-one-out k-NN image accuracy (what self-regularization must
protect), text MLM accuracy, and image<->text retrieval R@1/5/10. Each metric is reported when its
head and data exist. Runs on the main process only, without collectives."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset

from models.heads import ITCHead, MIMHead, MLMHead
from models.tasks.image_mim import mim_logits
from models.tasks.text_mlm import mlm_logits
from models.pretrained import load_head_weights
from util.checkpoint_io import Checkpoint

METRICS = ("image_mim_acc", "image_knn_acc", "text_mlm_acc", "itc_i2t_r1", "itc_i2t_r5", "itc_i2t_r10",
           "itc_t2i_r1", "itc_t2i_r5", "itc_t2i_r10")


@dataclass
class ProbeData:
    """Held-out sets (each with its collate), any of them may be missing."""

    images: tuple[Dataset, Callable] | None = None  # MIM samples; k-NN when they carry labels
    texts: tuple[Dataset, Callable] | None = None  # MLM-masked captions
    pairs: tuple[Dataset, Callable] | None = None  # image + caption(s)


def _batches(data: tuple[Dataset, Callable], batch_size: int, device: torch.device):
    dataset, collate = data
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        batch.pop("num_skipped", None)
        if batch:
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _heads(state: dict[str, torch.Tensor]) -> Checkpoint:
    return Checkpoint(path="(this stage's heads)", model=state, backbone_config=None)  # type: ignore[arg-type]


@torch.no_grad()
def mim_and_knn(backbone, head_state, data, tokenizer, batch_size, device, k: int = 20) -> dict[str, float]:
    out: dict[str, float] = {}
    head = None
    if tokenizer is not None and "mim_head.proj.weight" in head_state:
        head = MIMHead(backbone.cfg.embed_dim, head_state["mim_head.proj.weight"].shape[0])
        load_head_weights(head, _heads(head_state), "mim_head")
        head.to(device)
    correct = total = 0
    features, labels = [], []
    for batch in _batches(data, batch_size, device):
        if head is not None:
            batch["visual_token_ids"] = tokenizer.get_codebook_indices(batch.pop("tokenizer_image"))
            logits, target = mim_logits(backbone, head, batch)
            correct += (logits.argmax(-1) == target).sum().item()
            total += len(target)
        if "label" in batch:
            pooled = backbone.encode_image(batch["image"])[:, 1:].mean(1)  # mean of patch features (BEiT's probe)
            features.append(F.normalize(pooled.float(), dim=-1))
            labels.append(batch["label"])
    if total:
        out["image_mim_acc"] = correct / total
    if features and len(torch.cat(labels).unique()) > 1:
        out["image_knn_acc"] = knn_leave_one_out(torch.cat(features), torch.cat(labels), k)
    return out


def knn_leave_one_out(features: torch.Tensor, labels: torch.Tensor, k: int, temperature: float = 0.07) -> float:
    """Each sample classified by its k most similar others (similarity-weighted vote, DINO's rule)."""
    sims = features @ features.t()  # [N, N]
    sims.fill_diagonal_(-float("inf"))
    k = min(k, len(labels) - 1)
    top, index = sims.topk(k, dim=1)  # [N, k]
    votes = torch.zeros(len(labels), int(labels.max()) + 1, device=features.device)
    votes.scatter_add_(1, labels[index], (top / temperature).exp())
    return (votes.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def mlm_accuracy(backbone, head_state, data, batch_size, device) -> dict[str, float]:
    if "mlm_head.decoder.weight" not in head_state:
        return {}
    head = MLMHead(backbone.cfg.embed_dim, backbone.cfg.vocab_size, backbone.cfg.layer_norm_eps)
    load_head_weights(head, _heads(head_state), "mlm_head")
    head.to(device)
    correct = total = 0
    for batch in _batches(data, batch_size, device):
        logits, target = mlm_logits(backbone, head, batch)
        correct += (logits.argmax(-1) == target).sum().item()
        total += len(target)
    return {"text_mlm_acc": correct / total} if total else {}


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
def retrieval(backbone, head_state, data, tokenizer, max_text_len, batch_size, device) -> dict[str, float]:
    if "itc_head.logit_scale" not in head_state:
        return {}
    head = ITCHead(backbone.cfg.embed_dim).to(device)
    load_head_weights(head, _heads(head_state), "itc_head")
    dataset, _ = data
    image_emb, text_emb, owner, n_images = [], [], [], 0
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=lambda s: [x for x in s if x is not None])
    for samples in loader:
        if not samples:
            continue
        images = torch.stack([s["image"] for s in samples]).to(device)
        image_emb.append(head.embed_image(backbone.encode_image(images)[:, 0]))
        for i, s in enumerate(samples):
            captions = [s["caption"]] if isinstance(s["caption"], str) else list(s["caption"])
            enc = tokenizer(captions, padding="longest", truncation=True, max_length=max_text_len, return_tensors="pt")
            text_emb.append(head.embed_text(backbone.encode_text(enc["input_ids"].to(device),
                                                                  enc["attention_mask"].to(device))[:, 0]))
            owner += [n_images + i] * len(captions)
        n_images += len(samples)
    similarity = torch.cat(image_emb) @ torch.cat(text_emb).t()
    return recall_at_k(similarity, torch.tensor(owner, device=device))


def stage_report(backbone, head_state: dict[str, torch.Tensor], probes: ProbeData, device: torch.device,
                 visual_tokenizer=None, text_tokenizer=None, max_text_len: int = 40, batch_size: int = 64,
                 seed: int = 0) -> dict[str, Any]:
    """Every metric this backbone and these heads allow on the held-out probes."""
    import random

    was_training = backbone.training
    backbone.eval()
    random.seed(seed)  # the same masks in every report
    torch.manual_seed(seed)
    report: dict[str, Any] = {}
    if probes.images is not None:
        report.update(mim_and_knn(backbone, head_state, probes.images, visual_tokenizer, batch_size, device))
    if probes.texts is not None:
        report.update(mlm_accuracy(backbone, head_state, probes.texts, batch_size, device))
    if probes.pairs is not None and text_tokenizer is not None:
        report.update(retrieval(backbone, head_state, probes.pairs, text_tokenizer, max_text_len, batch_size, device))
    backbone.train(was_training)
    return report


def build_probes(args, kind: str, grid: tuple[int, int], text_tokenizer, val_set: Dataset, val_collate: Callable,
                 limit: int = 500) -> ProbeData:
    """Synthetic runs probe every modality on the synthetic world's val split; runs on real data
    probe what their held-out split holds (images, captions or pairs)."""
    from torch.utils.data import Subset

    from custom_datasets.collate import collate_skipping_bad
    from custom_datasets.pair_data import SyntheticCaptions
    from custom_datasets.pretrain_data import SYNTHETIC, build_image_datasets
    from custom_datasets.text_collate import CaptionCollator
    from custom_datasets.text_masking import masker_for

    def cap(dataset):
        if isinstance(dataset, IterableDataset):  # streamed held-out shards are used whole
            return dataset
        return Subset(dataset, range(min(limit, len(dataset))))

    text_collate = (CaptionCollator(text_tokenizer, args.max_text_len, masker_for(text_tokenizer, args.mlm_probability),
                                    train=False) if text_tokenizer is not None else None)
    if args.data_path in (None, SYNTHETIC) and not args.data_file_path:
        images = cap(build_image_datasets(args, grid)[1])
        texts = cap(SyntheticCaptions("val", args.synthetic_val_size, args.seed))
        return ProbeData(images=(images, collate_skipping_bad),
                         texts=(texts, text_collate) if text_collate else None,
                         pairs=(images, collate_skipping_bad))
    val = cap(val_set)
    if kind == "image":
        return ProbeData(images=(val, val_collate))
    if kind == "text":
        return ProbeData(texts=(val, text_collate))
    return ProbeData(images=(val, val_collate), pairs=(val, val_collate))


def format_report(report: dict[str, Any]) -> str:
    return "  ".join(f"{k} {report[k]:.3f}" for k in METRICS if k in report)
