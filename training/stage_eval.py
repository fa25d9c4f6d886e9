"""What a stage kept and what it learned, measured on held-out data after every stage (and by
`--eval`): image MIM accuracy and leave-one-out k-NN image accuracy (what self-regularization must
protect), text MLM accuracy, and image<->text retrieval R@1/5/10. Each metric is reported when its
head and data exist. Runs on the main process only, without collectives."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from common.console import say
from custom_datasets import batch as B
from custom_datasets.collate import collate_skipping_bad
from custom_datasets.pair_data import SyntheticCaptions
from custom_datasets.pretrain_data import build_image_datasets
from custom_datasets.settings import PretrainDataConfig
from custom_datasets.settings import is_synthetic
from custom_datasets.text_collate import CaptionCollator
from custom_datasets.text_masking import masker_for
from custom_datasets.masking import FractionMaskGenerator
from models.mae_decoder import masked_mse
from models.modes.image_mae import mae_outputs
from models.modes.image_mim import mim_logits
from models.modes.text_mlm import mlm_logits
from models.retrieval import pair_embeddings, recall_at_k, trivial_recall_note
from training.batch import ALL_TENSOR_KEYS, BatchPreparer

METRICS = ("image_mim_acc", "image_mim_loss", "image_mae_loss", "image_mae_r2", "image_knn_acc", "text_mlm_acc", "itc_i2t_r1", "itc_i2t_r5", "itc_i2t_r10",
           "itc_t2i_r1", "itc_t2i_r5", "itc_t2i_r10")


@dataclass
class ProbeData:
    """Held-out sets (each with its collate), any of them may be missing."""

    images: tuple[Dataset, Callable] | None = None  # MIM samples; k-NN when they carry labels
    texts: tuple[Dataset, Callable] | None = None  # MLM-masked captions
    pairs: tuple[Dataset, Callable] | None = None  # image + caption(s)


def _batches(data: tuple[Dataset, Callable], batch_size: int, prepare: BatchPreparer):
    dataset, collate = data
    return prepare.batches(DataLoader(dataset, batch_size=batch_size, collate_fn=collate), "stage report")


@torch.no_grad()
def mim_and_knn(backbone, head: nn.Module | None, data, prepare: BatchPreparer, batch_size: int,
                k: int = 20) -> dict[str, float]:
    out: dict[str, float] = {}
    correct = total = 0
    loss_sum = 0.0
    features, labels = [], []
    for batch in _batches(data, batch_size, prepare):
        if head is not None and B.VISUAL_TOKENS in batch:
            logits, target = mim_logits(backbone, head, batch)
            correct += (logits.argmax(-1) == target).sum().item()
            loss_sum += F.cross_entropy(logits.float(), target, reduction="sum").item()
            total += len(target)
        if B.LABEL in batch:
            pooled = backbone.encode_image(batch[B.IMAGE])[:, 1:].mean(1)  # mean of patch features (BEiT's probe)
            features.append(F.normalize(pooled.float(), dim=-1))
            labels.append(batch[B.LABEL])
    if total:  # the loss moves with every logit; the accuracy only when an argmax flips
        out["image_mim_acc"] = correct / total
        out["image_mim_loss"] = loss_sum / total
    if features and len(torch.cat(labels).unique()) > 1:
        out["image_knn_acc"] = knn_leave_one_out(torch.cat(features), torch.cat(labels), k)
    return out


def mae_masks(count: int, start: int, grid: tuple[int, int], ratio: float, seed: int) -> torch.Tensor:
    """MAE masks `[count, N]` of the probe's samples start.., each a function of its index alone (the
    same in every report, whatever the batch size)."""
    masker = FractionMaskGenerator(grid, ratio)
    return torch.stack([torch.from_numpy(masker(random.Random(f"{seed}:mae:{start + i}")).reshape(-1))
                        for i in range(count)])


@torch.no_grad()
def mae_reconstruction_error(backbone, decoder: nn.Module, data, prepare: BatchPreparer, batch_size: int,
                             seed: int) -> dict[str, float]:
    """The MAE objective on held-out images, with the masks and targets the decoder was trained with:
    its loss, and the share of the masked targets' energy it explains (1 - loss / the loss of
    predicting zeros, each patch's mean under --norm_pix_loss): 0 for a decoder that learned nothing."""
    error = energy = patches = 0.0  # sums over the masked patches of each one's mean squared error
    seen = 0
    for batch in _batches(data, batch_size, prepare):
        images = batch[B.IMAGE]
        mask = mae_masks(len(images), seen, decoder.grid, decoder.mask_ratio, seed).to(images.device)
        seen += len(images)
        prediction, target = mae_outputs(backbone, decoder, images, mask)
        count = mask.sum().item()
        error += masked_mse(prediction, target, mask).item() * count
        energy += masked_mse(torch.zeros_like(target), target, mask).item() * count
        patches += count
    if not energy:
        return {}
    return {"image_mae_loss": error / patches, "image_mae_r2": 1 - error / energy}


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
def mlm_accuracy(backbone, head: nn.Module, data, prepare: BatchPreparer, batch_size: int) -> dict[str, float]:
    correct = total = 0
    for batch in _batches(data, batch_size, prepare):
        logits, target = mlm_logits(backbone, head, batch)
        correct += (logits.argmax(-1) == target).sum().item()
        total += len(target)
    return {"text_mlm_acc": correct / total} if total else {}


def score_pairs(backbone, head: nn.Module, data, text_tokenizer, max_text_len: int, batch_size: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarity `[images, captions]`, image index of each caption) of the held-out pairs."""
    images, texts, owner = pair_embeddings(backbone, head, data[0], text_tokenizer, max_text_len, batch_size, device)
    return images @ texts.t(), owner


def stage_report(backbone, heads: dict[str, nn.Module], probes: ProbeData, device: torch.device,
                 visual_tokenizer=None, text_tokenizer=None, max_text_len: int = 40, batch_size: int = 64,
                 seed: int = 0) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor] | None]:
    """Every metric this backbone and these heads (`mim_head`, `mlm_head`, `itc_head`) allow on the
    held-out probes, and the pairs' scores behind the retrieval metrics (None without retrieval),
    which the retrieval pictures reuse."""
    was_training = backbone.training
    backbone.eval()
    random.seed(seed)  # the same masks in every report
    torch.manual_seed(seed)
    prepare = BatchPreparer(device, ALL_TENSOR_KEYS, visual_tokenizer)
    report: dict[str, Any] = {}
    if probes.images is not None:
        mim_head = heads.get("mim_head") if visual_tokenizer is not None else None
        report.update(mim_and_knn(backbone, mim_head, probes.images, prepare, batch_size))
        if "mae_decoder" in heads:
            report.update(mae_reconstruction_error(backbone, heads["mae_decoder"], probes.images, prepare, batch_size,
                                                   seed))
    if probes.texts is not None and "mlm_head" in heads:
        report.update(mlm_accuracy(backbone, heads["mlm_head"], probes.texts, prepare, batch_size))
    scores = None
    if probes.pairs is not None and text_tokenizer is not None and "itc_head" in heads:
        scores = score_pairs(backbone, heads["itc_head"], probes.pairs, text_tokenizer, max_text_len, batch_size, device)
        report.update(recall_at_k(*scores))
        report["itc_images"] = scores[0].shape[0]  # R@k of a random ranking: k / images
        if (note := trivial_recall_note(*scores[0].shape)) is not None:
            say(f"stage report: {note}")
    backbone.train(was_training)
    return report, scores


def build_probes(cfg: PretrainDataConfig, kind: str, grid: tuple[int, int], text_tokenizer, val_set: Dataset,
                 val_collate: Callable, limit: int = 500) -> ProbeData:
    """Synthetic runs probe every modality on the synthetic world's val split; runs on real data
    probe what their held-out split holds (images, captions or pairs; the captions of pairs too
    when they are collated with MLM masks, as compound_pretrain's are)."""
    def cap(dataset):
        if isinstance(dataset, IterableDataset):  # streamed held-out shards are used whole
            return dataset
        return Subset(dataset, range(min(limit, len(dataset))))

    text_collate = (CaptionCollator(text_tokenizer, cfg.text.max_text_len,
                                    masker_for(text_tokenizer, cfg.text.mlm_probability), train=False)
                    if text_tokenizer is not None else None)
    if is_synthetic(cfg) and not cfg.text.data_file_path:
        images = cap(build_image_datasets(cfg, grid)[1])
        texts = cap(SyntheticCaptions("val", cfg.data.synthetic_val_size, cfg.seed))
        return ProbeData(images=(images, collate_skipping_bad),
                         texts=(texts, text_collate) if text_collate else None,
                         pairs=(images, collate_skipping_bad))
    val = cap(val_set)
    if kind == "image":
        return ProbeData(images=(val, val_collate))
    if kind == "text":
        return ProbeData(texts=(val, text_collate))
    masked_captions = getattr(val_collate, "masker", None) is not None  # pairs collated for MLM too (compound)
    return ProbeData(images=(val, val_collate), pairs=(val, val_collate),
                     texts=(val, val_collate) if masked_captions else None)


def format_report(report: dict[str, Any]) -> str:
    return "  ".join(f"{k} {report[k]:.3f}" for k in METRICS if k in report)
