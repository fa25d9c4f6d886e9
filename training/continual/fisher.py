"""The diagonal Fisher information of a stage's own objective at its final weights, for EWC in the
next stage: the squared gradients of mini-batch losses with respect to every backbone weight,
averaged over batches (Avalanche's estimate; per-sample gradients do not exist for a contrastive
loss, whose negatives are the rest of the batch). For an adapted linear the gradient is taken with
respect to the merged weight W + ΔW, which is what the next stage starts from. Written beside the
stage's checkpoints as a safetensors sidecar; every rank takes part (the objective may gather).
Under FSDP, which reduce-scatters gradients as they are made, the squared gradient is the global
batch's (one process with the global batch gives the same) and only the trained weights have one."""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from common import distributed as dist_util
from common.checkpoint_io import load_safetensors_file, save_safetensors
from common.console import say
from common.errors import UserError
from common.sharded_tensors import local_part, whole_from_rows
from custom_datasets.batch import NUM_SKIPPED
from models.lora import is_adapter_key, plain_names
from training.continual.anchors import is_sharded_backbone

if TYPE_CHECKING:
    from training.continual.base import Stage
    from training.pretrain import Optimization

FISHER_FILE = "fisher.safetensors"


def write_fisher(run: "Stage", optim: "Optimization") -> int:
    """The stage's Fisher sidecar for an ewc stage after it (--fisher_samples), estimated on every
    rank and written by the main one; returns the batches it used."""
    samples = run.cfg.continual.fisher_samples
    fisher, batches = estimate_fisher(run, optim, samples)
    batches *= run.ctx.world
    if run.ctx.is_main:
        path = run.ctx.output_dir / FISHER_FILE
        save_fisher(path, fisher, run.cfg.exp_name, batches, samples)
        say(f"saved {path} (diagonal Fisher information over {batches} batches, for --cl_method ewc in the next stage)")
    return batches


def estimate_fisher(run: "Stage", optim: "Optimization", samples: int) -> tuple[dict[str, torch.Tensor], int]:
    """(plain backbone name -> mean squared gradient, batches used) over about `samples` training samples."""
    mode, backbone = run.mode, run.backbone
    batches = max(1, math.ceil(samples / (optim.train_loader.batch_size * run.ctx.world)))
    params = {k: p for k, p in plain_names(dict(backbone.named_parameters())).items() if not is_adapter_key(k)}
    was_training = mode.training
    mode.eval()  # no dropout; a compound objective measures all of its parts
    try:
        if is_sharded_backbone(backbone):
            return _sharded_estimate(run, optim, batches, params)
        return _per_process_estimate(run, optim, batches, params)
    finally:
        mode.train(was_training)


def _batches(optim: "Optimization", count: int) -> Iterator[dict]:
    for batch in itertools.islice(optim.train_loader, count):
        batch.pop(NUM_SKIPPED, None)
        yield batch


def _per_process_estimate(run, optim, batches: int, params: dict[str, torch.Tensor]):
    """Each process squares its own mini-batches' gradients (of every backbone weight, frozen or
    not); the squares are averaged over all processes' batches."""
    mode = run.mode
    was = {k: p.requires_grad for k, p in mode.named_parameters()}
    for p in mode.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    used = 0
    try:
        for batch in _batches(optim, batches):
            if not batch:
                continue
            loss = mode(optim.prepare(batch))["loss"]
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (name, _), grad in zip(params.items(), grads):
                if grad is not None:
                    sums[name] += grad.float().pow(2)
            used += 1
    finally:
        for name, p in mode.named_parameters():
            p.requires_grad_(was[name])
    total = dist_util.all_reduce_sum(torch.tensor(float(used), device=run.ctx.device)).item()
    _require_batches(total)
    return {k: (dist_util.all_reduce_sum(v) / total).cpu() for k, v in sums.items()}, used


def _sharded_estimate(run, optim, batches: int, params: dict[str, torch.Tensor]):
    """Under FSDP: the gradient FSDP makes, each process's rows of the mean gradient of the global
    batch (all processes' mini-batches together), squared, for the weights that train (FSDP makes
    none for a frozen one). The same estimate as one process with the global batch."""
    mode = run.mode
    trained = {k: p for k, p in params.items() if p.requires_grad}
    sums = {k: torch.zeros_like(local_part(p), dtype=torch.float32) for k, p in trained.items()}
    used = 0
    for batch in _batches(optim, batches):
        if not dist_util.every_rank(bool(batch), run.ctx.device):  # the forward gathers: all or none
            continue
        mode.zero_grad(set_to_none=True)
        mode(optim.prepare(batch))["loss"].backward()
        for name, p in trained.items():
            if p.grad is not None:
                sums[name] += local_part(p.grad).float().pow(2)
        used += 1
    mode.zero_grad(set_to_none=True)
    _require_batches(used)
    return {k: (whole_from_rows(v, trained[k]) / used).cpu() for k, v in sums.items()}, used


def _require_batches(count: float) -> None:
    if count == 0:
        raise UserError("--fisher_samples: every training batch was unreadable; no Fisher information to estimate")


def save_fisher(path: Path, fisher: dict[str, torch.Tensor], objective: str, batches: int, samples: int) -> None:
    save_safetensors(path, fisher, {"objective": objective, "batches": str(batches), "samples": str(samples),
                                    "estimate": "mean squared mini-batch gradient"})


def fisher_beside(start: str) -> Path:
    return Path(start).parent / FISHER_FILE


def load_fisher(start: str | None) -> dict[str, torch.Tensor]:
    """The Fisher sidecar of the stage whose weights `start` (--init_from) holds."""
    if not start:
        raise UserError("--cl_method ewc needs the previous stage's weights: pass --init_from")
    path = fisher_beside(start)
    if not path.is_file():
        raise UserError(f"--cl_method ewc needs the previous stage's Fisher information, {path}, which is missing; "
                        f"run the previous stage with --fisher_samples N (e.g. 1024)")
    tensors, _ = load_safetensors_file(path)
    return tensors
