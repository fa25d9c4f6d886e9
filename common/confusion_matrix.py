"""Semantic-segmentation metrics from a confusion matrix, as mmseg and the ADE20K devkit compute
them: per-class IoU = TP / (TP + FP + FN), mIoU their mean over the classes that occur (in the
ground truth or the prediction: a class with an empty union has no IoU and is left out, not
counted as 0 or 1), per-class accuracy (recall) and pixel accuracy. Pixels labelled with the ignore
index count nowhere. The matrix is a sum, so ranks add theirs up before the metrics are taken."""
from __future__ import annotations

import torch

SEG_IGNORE = 255  # mask value of unlabelled pixels (mmseg's and ADE20K's convention after reduce_zero_label)
# prefix of the per-class IoU entries of a metrics dict; such an entry is NaN for a class that is
# absent (neither in the masks nor predicted): an absence, not a sign of divergence
PER_CLASS_IOU = "IoU."


class ConfusionMatrix:
    """`counts[true, predicted]` over every labelled pixel seen."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, predicted: torch.Tensor, target: torch.Tensor, ignore_index: int = SEG_IGNORE) -> None:
        """`predicted`, `target`: integer maps of the same shape. Target values outside
        [0, num_classes) other than `ignore_index` are an error, not silently dropped."""
        if predicted.shape != target.shape:
            raise ValueError(f"prediction {tuple(predicted.shape)} and mask {tuple(target.shape)} differ in shape")
        keep = target != ignore_index
        target, predicted = target[keep].long(), predicted[keep].long()
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(f"mask holds label {int(target.max())} but there are {self.num_classes} classes")
        flat = target * self.num_classes + predicted.to(target.device)
        self.counts += torch.bincount(flat, minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def add(self, counts: torch.Tensor) -> None:
        self.counts += counts.to(self.counts)

    def per_class_iou(self) -> torch.Tensor:
        """`[C]` IoU per class; NaN for classes absent from both ground truth and prediction."""
        tp = self.counts.diag().double()
        union = self.counts.sum(0).double() + self.counts.sum(1).double() - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def per_class_accuracy(self) -> torch.Tensor:
        """`[C]` fraction of each class's pixels predicted as it; NaN for classes with no pixels."""
        tp, total = self.counts.diag().double(), self.counts.sum(1).double()
        return torch.where(total > 0, tp / total.clamp(min=1), torch.full_like(tp, float("nan")))

    def labelled_pixels(self) -> int:
        return int(self.counts.sum().item())

    def summary(self) -> dict[str, float]:
        """mIoU, mAcc and aAcc (pixel accuracy), in percent as mmseg reports them."""
        total = self.counts.sum().item()
        return {"mIoU": 100 * nanmean(self.per_class_iou()), "mAcc": 100 * nanmean(self.per_class_accuracy()),
                "aAcc": 100 * self.counts.diag().sum().item() / total if total else float("nan")}


def nanmean(values: torch.Tensor) -> float:
    present = values[~values.isnan()]
    return present.mean().item() if present.numel() else float("nan")
