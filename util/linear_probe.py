"""Linear probing (MAE's protocol): the backbone is frozen, features of one block (mean-pooled
patch tokens) are computed once and cached, and a BatchNorm (no affine) + linear head is trained
on them, which makes probing a checkpoint take seconds to minutes."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from util.errors import UserError


@torch.no_grad()
def extract_features(backbone, dataset, layer: int, batch_size: int, device: torch.device, num_workers: int = 0):
    """`[N, D]` mean-pooled output of block `layer` and `[N]` labels; unreadable images skipped."""
    from custom_datasets.collate import collate_skipping_bad

    captured: list[torch.Tensor] = []
    hook = backbone.blocks[layer].register_forward_hook(lambda m, i, out: captured.append(out))
    feats, labels = [], []
    backbone.eval()
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skipping_bad):
            batch.pop("num_skipped")
            if not batch:
                continue
            captured.clear()
            backbone.encode_image(batch["image"].to(device))
            feats.append(captured[0][:, 1:].mean(1).float().cpu())  # [B, D]
            labels.append(batch["label"])
    finally:
        hook.remove()
    if not feats:
        raise UserError("no readable images to extract features from")
    return torch.cat(feats), torch.cat(labels)


class ProbeHead(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.classifier = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(features))


def train_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                epochs: int, lr: float, batch_size: int, seed: int, log_path: Path | None = None) -> tuple[ProbeHead, dict]:
    """LARS-free variant of MAE's probe: SGD with momentum and cosine lr on cached features."""
    from engine_finetune import topk_correct
    from util.lr_sched import lr_at

    torch.manual_seed(seed)
    head = ProbeHead(train[0].shape[1], num_classes)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    n = len(train[0])
    steps = max(1, n // batch_size)
    best: dict = {"test_acc1": -1.0}
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
        head.eval()
        with torch.no_grad():
            logits = head(val[0])
            acc = topk_correct(logits, val[1])
            stats = {"epoch": epoch, "train_loss": total / steps, "test_loss": nn.functional.cross_entropy(logits, val[1]).item(),
                     "test_acc1": acc["acc1"], "test_acc5": acc["acc5"]}
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(stats) + "\n")
        if stats["test_acc1"] > best["test_acc1"]:
            best = stats
    return head, best


def run_linear_probe(args: argparse.Namespace, device: torch.device) -> dict:
    from custom_datasets.classification_data import build_classification_datasets, build_transform
    from main_finetune import build_classifier
    from util.checkpoint_io import save_weights

    eval_transform = build_transform(args, train=False)  # features are cached, so no random augmentation
    train_set, val_set = build_classification_datasets(args, eval_transform, eval_transform)
    num_classes = args.nb_classes or len(train_set.class_to_idx)
    model, report = build_classifier(args, num_classes)
    backbone = model.backbone.to(device).requires_grad_(False)
    layer = backbone.cfg.depth - 1 if args.probe_layer is None else args.probe_layer
    if not 0 <= layer < backbone.cfg.depth:
        raise UserError(f"--probe_layer {args.probe_layer} is outside the model's blocks 0..{backbone.cfg.depth - 1}")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"linear_probe: block {layer} of {backbone.cfg.depth}, {num_classes} classes "
          f"({len(train_set)} train / {len(val_set)} val images); " + "; ".join(report))
    start = time.time()
    train = extract_features(backbone, train_set, layer, args.batch_size, device, args.num_workers)
    val = extract_features(backbone, val_set, layer, args.batch_size, device, args.num_workers)
    print(f"features cached in {time.time() - start:.0f}s")
    lr = args.lr or args.blr * args.batch_size / 256
    head, best = train_probe(train, val, num_classes, args.epochs, lr, args.batch_size, args.seed, output_dir / "log.txt")
    save_weights(output_dir / "probe_head.safetensors", {f"probe.{k}": v for k, v in head.state_dict().items()},
                 backbone.cfg.to_dict(), {"probe_layer": str(layer)})
    print(f"done: best test acc1 {best['test_acc1']:.2f} (epoch {best['epoch']}); saved {output_dir / 'probe_head.safetensors'}")
    return {"best_acc1": best["test_acc1"], **best}
