"""What every downstream task shares, mirroring the pretraining modes: a `model` (what checkpoints
save and exports read: backbone + the task's heads), the data kind it reads, the input paths it
uses (the others are frozen), and a forward that returns `loss` plus named scalars; in evaluation
mode the scalars are the task's per-sample metrics, averaged over the held-out set. Tasks whose
metric needs the whole held-out set at once (retrieval) set `set_level_metrics` and implement
`evaluate_set`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from models.modes.base import unused_parameter_names


@dataclass
class SegmentationOptions:
    """The decoder and the held-out inference of semantic segmentation."""

    decoder_channels: int | None = None  # None: the backbone's width (BEiT)
    aux_channels: int = 256
    aux_loss_weight: float = 0.4
    block_indices: tuple[int, ...] | None = None  # None: BEiT's 4, 6, 8, 12 of 12, scaled to the depth
    inference: str = "slide"
    stride: int | None = None  # None: 2/3 of the crop
    aug_test: bool = False


@dataclass
class DownstreamOptions:
    """Run settings a task may need, built once from the fine-tuning config."""

    num_classes: int = 0
    use_cls: bool = False
    smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    max_text_len: int = 40
    class_names: tuple[str, ...] = ()  # the data's class names (VQA: the answer vocabulary)
    rerank_k: int = 0  # retrieval: re-rank each contrastive shortlist of k with the matching head (0: off)
    segmentation: SegmentationOptions = field(default_factory=SegmentationOptions)


class DownstreamTask(nn.Module):
    name: ClassVar[str] = ""
    data_kind: ClassVar[str] = ""  # "image_folder" | "labelled_text" | "image_text_pairs" | "segmentation"
    paths: ClassVar[frozenset[str]] = frozenset()
    heads: ClassVar[tuple[str, ...]] = ()  # attribute names of `model` a checkpoint may already hold
    best_metric: ClassVar[str] = "acc1"
    cached_features: ClassVar[bool] = False  # linear probing: features computed once, no backbone training
    set_level_metrics: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init__(self, model: nn.Module, options: DownstreamOptions) -> None:
        super().__init__()
        self.model, self.options = model, options

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def frozen_parameter_names(self) -> list[str]:
        """Parameters of `model` that the task never uses (no gradient ever; DDP needs them frozen)."""
        return unused_parameter_names(self.model, self.paths)

    def prepare_train_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A training batch after it reached the device (e.g. Mixup); identity by default."""
        return batch

    def evaluate_set(self, dataset: Any, batch_size: int, device: torch.device) -> dict[str, float]:
        raise NotImplementedError(f"{self.name} has per-batch metrics")

    def start_evaluation(self) -> None:
        """Called before each held-out pass; tasks that collect per-example outputs reset them."""

    def finish_evaluation(self, stats: dict[str, float]) -> dict[str, float]:
        """The pass's averaged metrics, completed from what forward collected (every rank calls it)."""
        return stats

    def held_out_outputs(self) -> dict[str, Any]:
        """`{file name: JSON value}` written to the output folder after each held-out pass (VQA's
        results file in the challenge's format); none by default."""
        return {}

    def example_predictions(self, dataset: Any, device: torch.device) -> dict[str, Any] | None:
        """Held-out inputs, truths and predictions to draw after each evaluation (TensorBoard and
        pictures/), or None for tasks that show none."""
        return None
