"""Semantic segmentation as BEiT fine-tunes it: UPerNet + auxiliary FCN on four blocks' features,
per-pixel cross-entropy that ignores unlabelled pixels (the auxiliary loss weighted 0.4); held-out
metrics (mIoU, mAcc, aAcc and per-class IoU) from one confusion matrix summed over ranks, each image
predicted at its own size by sliding-window or whole-image inference (optionally multi-scale + flip)."""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from common import distributed as dist_util
from common.confusion_matrix import PER_CLASS_IOU, SEG_IGNORE, ConfusionMatrix
from common.errors import UserError
from common.metrics import with_progress
from custom_datasets import batch as B
from models.backbone import VLMoBackbone
from models.downstream.base import DownstreamOptions, DownstreamTask
from models.segmentation_head import SegmentationHead, default_block_indices, resize
from models.segmentation_inference import AUG_TEST_RATIOS, segment_probabilities
from models.segmenter import Segmenter


def same_size_runs(dataset: Dataset, indices: range, most: int) -> Iterator[list]:
    """The samples at `indices` in runs of up to `most` consecutive ones whose image and mask sizes
    agree (one forward each; one run in memory at a time). Unreadable samples (None) come alone."""
    run: list = []
    for index in indices:
        sample = dataset[index]
        key = None if sample is None else sizes_of(sample)
        if run and (key is None or len(run) >= most or sizes_of(run[0]) != key):
            yield run
            run = []
        run.append(sample)
        if key is None:
            yield run
            run = []
    if run:
        yield run


def sizes_of(sample: dict[str, torch.Tensor]) -> tuple:
    return tuple(sample[B.IMAGE].shape), tuple(sample[B.SEG_MASK].shape)


def masked_cross_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels, logits upsampled to the mask; 0 (not NaN) for a
    batch with no labelled pixel."""
    logits = resize(logits.float(), mask.shape[-2:])
    total = F.cross_entropy(logits, mask, ignore_index=SEG_IGNORE, reduction="sum")
    return total / (mask != SEG_IGNORE).sum().clamp(min=1)


class SemanticSegmentation(DownstreamTask):
    name = "semantic_segmentation"
    description = ("per-pixel classes with UPerNet on four blocks (BEiT): images/{training,validation}/ and "
                   "annotations/{training,validation}/ (ADE20K's layout)")
    data_kind = "segmentation"
    paths = frozenset({"image"})
    heads = ("seg_head",)
    best_metric = "mIoU"
    set_level_metrics = True

    def __init__(self, backbone: VLMoBackbone, options: DownstreamOptions) -> None:
        seg = options.segmentation
        depth, dim = backbone.cfg.depth, backbone.cfg.embed_dim
        head = SegmentationHead(dim, options.num_classes, seg.decoder_channels or dim, seg.aux_channels,
                                seg.block_indices or default_block_indices(depth))
        super().__init__(Segmenter(backbone, head), options)
        self.crop = backbone.cfg.img_size

    def frozen_parameter_names(self) -> list[str]:
        """Besides the text and pair paths: the final norm and blocks after the last one read."""
        last = max(self.model.seg_head.block_indices)
        later = tuple(f"backbone.blocks.{i}." for i in range(last + 1, self.backbone.cfg.depth))
        return super().frozen_parameter_names() + [
            n for n, _ in self.model.named_parameters() if n.startswith(("backbone.norm.", "backbone.mask_token") + later)]

    def prepare_train_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """BatchNorm cannot train on one sample (the 1x1 pyramid-pooling map has one value per
        channel): a batch that unreadable files left with one image gets its mirror image too."""
        if batch[B.IMAGE].shape[0] != 1:
            return batch
        return {**batch, B.IMAGE: torch.cat([batch[B.IMAGE], batch[B.IMAGE].flip(-1)]),
                B.SEG_MASK: torch.cat([batch[B.SEG_MASK], batch[B.SEG_MASK].flip(-1)])}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, aux = self.model.head_logits(batch[B.IMAGE], with_aux=True)
        decode_loss = masked_cross_entropy(logits, batch[B.SEG_MASK])
        aux_loss = masked_cross_entropy(aux, batch[B.SEG_MASK])
        loss = decode_loss + self.options.segmentation.aux_loss_weight * aux_loss
        return {"loss": loss, "loss_decode": decode_loss.detach(), "loss_aux": aux_loss.detach()}

    def probabilities(self, images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """`[B, C, *out_size]` class probabilities of normalised `[B, 3, H, W]` images."""
        seg = self.options.segmentation
        return segment_probabilities(self.model, images, self.crop, seg.inference, seg.stride,
                                     AUG_TEST_RATIOS if seg.aug_test else (1.0,), seg.aug_test, out_size)

    def evaluate_set(self, dataset: Dataset, batch_size: int, device: torch.device) -> dict[str, float]:
        """Each rank predicts its share of the images, consecutive images of the same size together;
        the confusion matrices are summed over ranks."""
        matrix = ConfusionMatrix(self.options.num_classes, device)
        mine = range(dist_util.rank(), len(dataset), dist_util.world_size())
        skipped = 0
        for samples in with_progress(same_size_runs(dataset, mine, batch_size), "segmentation eval"):
            skipped += samples.count(None)
            samples = [s for s in samples if s is not None]
            if samples:
                masks = torch.stack([s[B.SEG_MASK] for s in samples]).to(device)  # [b, H, W]
                images = torch.stack([s[B.IMAGE] for s in samples]).to(device)
                matrix.update(self.probabilities(images, tuple(masks.shape[1:])).argmax(1), masks)
        matrix.counts = dist_util.all_reduce_sum(matrix.counts)
        skipped = int(dist_util.all_reduce_sum(torch.tensor(skipped, device=device)).item())
        if not matrix.labelled_pixels():
            raise UserError(f"the held-out masks ({len(dataset)} images, {skipped} unreadable) have no labelled pixel "
                            f"(all {SEG_IGNORE}, or 0 with ADE20K's layout): there is nothing to score; check the masks")
        names = getattr(dataset, "class_names", None) or [str(i) for i in range(self.options.num_classes)]
        per_class = {f"{PER_CLASS_IOU}{name}": 100 * v for name, v in zip(names, matrix.per_class_iou().tolist())}
        return {**matrix.summary(), **per_class, **({"unreadable": skipped} if skipped else {})}

    @torch.no_grad()
    def example_predictions(self, dataset: Dataset, device: torch.device, count: int = 4) -> dict[str, Any] | None:
        """Inputs (in [0, 1], at the masks' size), ground truths and predictions of the first
        held-out images: what TensorBoard's panel shows."""
        view = getattr(dataset, "view", None)
        mean, std = view.mean_std() if view is not None else ((0.5,) * 3, (0.5,) * 3)
        images, truths, predictions = [], [], []
        for index in range(min(count, len(dataset))):
            sample = dataset[index]
            if sample is None:
                continue
            mask = sample[B.SEG_MASK]
            predicted = self.probabilities(sample[B.IMAGE][None].to(device), tuple(mask.shape))[0].argmax(0).cpu()
            image = sample[B.IMAGE] * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
            images.append(resize(image[None], mask.shape)[0].clamp(0, 1))
            truths.append(mask)
            predictions.append(predicted)
        return {"images": images, "truths": truths, "predictions": predictions} if images else None
