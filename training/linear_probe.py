"""Linear probing (MAE's protocol): the backbone is frozen, features of one block (mean-pooled
patch tokens, or its [CLS] token with --use_cls) are computed once and cached, and a BatchNorm (no
affine) + linear head is trained on them, which makes probing a checkpoint take seconds to minutes."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from common.checkpoint_io import Checkpoint, save_weights
from common.console import say
from common.errors import UserError
from common.lr_sched import lr_at
from common.json_records import json_record
from custom_datasets import batch as B
from custom_datasets.classification_data import build_transform
from custom_datasets.collate import collate_skipping_bad
from custom_datasets.downstream_data import image_folders
from models.downstream.image_classification import topk_accuracy
from models.downstream.linear_probe import ProbeHead
from training.batch import BatchPreparer
from training.config import FinetuneConfig
from training.finetune_model import build_task
from training.optim import learning_rate
from training.scaffold import RunContext, refuse_taken_output


@torch.no_grad()
def extract_features(backbone, dataset, layer: int, batch_size: int, device: torch.device, num_workers: int = 0,
                     use_cls: bool = False):
    """`[N, D]` mean-pooled patch tokens of block `layer` (its [CLS] token with `use_cls`: what
    BEiT v2's patch aggregation trains) and `[N]` labels; unreadable images skipped."""
    captured: list[torch.Tensor] = []
    hook = backbone.blocks[layer].register_forward_hook(lambda m, i, out: captured.append(out))
    feats, labels = [], []
    backbone.eval()
    prepare = BatchPreparer(device, (B.IMAGE, B.LABEL))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skipping_bad)
    try:
        for batch in prepare.batches(loader, "linear probe: caching features"):
            captured.clear()
            backbone.encode_image(batch[B.IMAGE])
            tokens = captured[0]  # [B, 1 + N, D]
            feats.append((tokens[:, 0] if use_cls else tokens[:, 1:].mean(1)).float().cpu())  # [B, D]
            labels.append(batch[B.LABEL].cpu())
    finally:
        hook.remove()
    if not feats:
        raise UserError("no readable images to extract features from")
    return torch.cat(feats), torch.cat(labels)


def probe_epoch_stats(head: ProbeHead, val: tuple[torch.Tensor, torch.Tensor], epoch: int, train_loss: float) -> dict:
    head.eval()
    with torch.no_grad():
        logits = head(val[0])
        acc = {k: float(v) for k, v in topk_accuracy(logits, val[1]).items()}
        return {"epoch": epoch, "train_loss": train_loss, "test_loss": nn.functional.cross_entropy(logits, val[1]).item(),
                **{f"test_{k}": v for k, v in acc.items()}}


def train_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                epochs: int, lr: float, batch_size: int, seed: int, log_path: Path | None = None,
                selection: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[ProbeHead, dict, dict]:
    """LARS-free variant of MAE's probe: SGD with momentum and cosine lr on cached features. Returns
    the last head, the best epoch's statistics (chosen on `selection` when given, else on `val`) and
    the last epoch's."""
    torch.manual_seed(seed)
    head = ProbeHead(train[0].shape[1], num_classes)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    n = len(train[0])
    steps = max(1, n // batch_size)
    best: dict = {}
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(n)
        total = 0.0
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch + step / steps, lr, 0.0, min(10, epochs // 10), epochs)
            idx = order[step * batch_size:(step + 1) * batch_size]
            loss = nn.functional.cross_entropy(head(train[0][idx]), train[1][idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        stats = probe_epoch_stats(head, val, epoch, total / steps)
        if selection is not None:
            chosen = probe_epoch_stats(head, selection, epoch, total / steps)
            stats["selection_acc1"] = chosen["test_acc1"]
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json_record(stats) + "\n")
        key = "selection_acc1" if selection is not None else "test_acc1"
        if stats[key] > best.get(key, -1.0):
            best = stats
    return head, best, stats


def run_linear_probe(cfg: FinetuneConfig, ctx: RunContext, ckpt: Checkpoint | None) -> dict:
    # features are cached, so no random augmentation
    view = build_transform(cfg.augment, cfg.model.input_size, train=False)
    data = image_folders(cfg.data, cfg.augment, cfg.model.input_size, view, view)
    refuse_taken_output(cfg.run.output_dir, cfg.run.eval)
    num_classes = cfg.model.nb_classes or len(data.class_names)
    task, report = build_task(cfg, ckpt, num_classes)
    backbone = task.backbone.to(ctx.device).requires_grad_(False)
    layer = backbone.cfg.depth - 1 if cfg.model.probe_layer is None else cfg.model.probe_layer
    if not 0 <= layer < backbone.cfg.depth:
        raise UserError(f"--probe_layer {layer} is outside the model's blocks 0..{backbone.cfg.depth - 1}")
    output_dir = ctx.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    use_cls, features = cfg.model.use_cls, "[CLS] token" if cfg.model.use_cls else "mean-pooled patches"
    say(f"linear_probe: {features} of block {layer} of {backbone.cfg.depth}, {num_classes} classes "
          f"({len(data.train)} train / {len(data.val)} val images); " + "; ".join(report))
    start = time.time()
    opt = cfg.optim
    train, val, selection = (None if split is None else extract_features(
        backbone, split, layer, opt.batch_size, ctx.device, cfg.data.num_workers, use_cls)
        for split in (data.train, data.val, data.selection))
    say(f"features cached in {time.time() - start:.0f}s")
    lr = learning_rate(opt.lr, opt.blr, opt.batch_size, "sgd")
    head, best, last = train_probe(train, val, num_classes, opt.epochs, lr, opt.batch_size, cfg.run.seed,
                                   output_dir / "log.txt", selection)
    if opt.checkpoint_epoch == "last":  # the head saved is the last epoch's, and so is the figure reported
        best = last
    save_weights(output_dir / "probe_head.safetensors", {f"probe.{k}": v for k, v in head.state_dict().items()},
                 backbone.cfg.to_dict(), {"probe_layer": str(layer), "probe_features": features})
    chosen_on = ("--checkpoint_epoch last" if opt.checkpoint_epoch == "last" else
                 f"chosen on {len(selection[1])} training images held out" if selection is not None
                 else "chosen on the same val set")
    say(f"done: last epoch test acc1 {last['test_acc1']:.2f} (the saved head); best {best['test_acc1']:.2f} at epoch "
        f"{best['epoch']} ({chosen_on}); saved {output_dir / 'probe_head.safetensors'}")
    return {"best_acc1": best["test_acc1"], **best, "last_acc1": last["test_acc1"]}
