"""Non-finite guards: a run stops with one sentence naming the epoch and step, what went
non-finite (loss, gradients, weights, evaluation) and the likely cause, before anything of it is
saved. Under fp16 an overflow step is normal: the loss scaler skips it, and it is counted.
Training steps are watched on the device (`FinitenessWatch`): the first bad step is recorded
without reading anything back to the host, and read at each --print_freq step and at the end of
the epoch, before anything is saved."""
from __future__ import annotations

import math
from typing import Any

import torch

from common import distributed as dist_util
from common.confusion_matrix import PER_CLASS_IOU
from common.errors import UserError
from common.sharded_tensors import local_part
from training.fsdp import is_sharded


def likely_cause(lr: float, amp_dtype: torch.dtype | None, clip_grad: float | None) -> str:
    if amp_dtype == torch.float16:
        return "fp16 overflow: use --amp bf16 or --amp none"
    return f"the optimisation diverged: lower --blr / --lr (the lr is {lr:.3g})" + (
        "" if clip_grad else " or clip the gradients with --clip_grad 3.0")


LOSS, GRADIENTS = 0, 1


class FinitenessWatch:
    """The first step of an epoch whose loss (or clipped gradient norm) was not finite, with its
    value, kept as device tensors: noting a step costs no host synchronisation; `check` reads it."""

    def __init__(self, device: torch.device) -> None:
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.kind = torch.zeros((), dtype=torch.long, device=device)
        self.value = torch.zeros((), device=device)
        self.no_targets = torch.zeros((), dtype=torch.bool, device=device)

    def note(self, value: torch.Tensor, step: int, kind: int, out: dict[str, Any] | None = None) -> None:
        value = value.detach().float()
        first = ~torch.isfinite(value) & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.kind = torch.where(first, kind, self.kind)
        self.value = torch.where(first, value, self.value)
        if out is not None:  # an accuracy over no targets is NaN: nothing to predict in this batch
            empty = [v.detach().isnan().any() for k, v in out.items() if k.startswith("acc_") and isinstance(v, torch.Tensor)]
            if empty:
                self.no_targets = torch.where(first, torch.stack(empty).any(), self.no_targets)

    def check(self, epoch: int, cause: str) -> None:
        step, kind, no_targets = torch.stack([self.step, self.kind, self.no_targets.long()]).tolist()
        if step < 0:
            return
        value = self.value.item()
        if kind == GRADIENTS:
            raise UserError(f"the gradients became non-finite at epoch {epoch} step {step} (norm {value}); nothing of "
                            f"this epoch was saved, the last checkpoint is intact; likely cause: {cause}")
        if no_targets:
            raise UserError(f"the loss became {value} at epoch {epoch} step {step} because the batch had no prediction "
                            f"targets (an accuracy over zero items, e.g. only empty captions); check the data")
        raise UserError(f"the loss became {value} at epoch {epoch} step {step}; nothing of this epoch was saved, the last "
                        f"checkpoint is intact; likely cause: {cause}")


def check_weights(model: torch.nn.Module, epoch: int, cause: str) -> None:
    """After an epoch, before evaluating and saving it."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(local_part(p)).all()]
    if is_sharded(model):  # each rank sees its shards: all stop together, or none does
        bad_anywhere = dist_util.all_reduce_sum(torch.tensor(len(bad), device=next(model.parameters()).device)).item()
        bad = bad or (["a shard on another rank"] * int(bad_anywhere))
    if bad:
        raise UserError(f"the weights became non-finite during epoch {epoch} (e.g. {bad[0]}, {len(bad)} tensors); this "
                        f"epoch was not saved, the last checkpoint is intact; likely cause: {cause}")


def check_evaluation(stats: dict[str, float], epoch: int, cause: str) -> None:
    """A NaN evaluation means diverged weights even when each one is finite (e.g. 1e30). A class's
    IoU is NaN when the class is absent from the held-out masks and the predictions: that is the
    data, not divergence (a diverged model still predicts some class everywhere, so the present
    classes and the mean stay finite and fall)."""
    bad = sorted(k for k, v in stats.items() if not math.isfinite(v) and not k.startswith(PER_CLASS_IOU))
    if bad:
        raise UserError(f"the evaluation after epoch {epoch} gave {bad[0]} {stats[bad[0]]}: the weights diverged; this "
                        f"epoch was not saved, the last checkpoint is intact; likely cause: {cause}")
