"""Continual pretraining of the shared backbone (today: BEiT image MIM).

    python main_pretrain_cook.py --config configs/demo_image_mim.yaml          # laptop demo, synthetic data
    torchrun --nproc_per_node 8 main_pretrain_cook.py --exp_name image_mim --model vlmo_base_patch16 \\
        --data_path /data/imagenet/train --d_vae_type dall-e --d_vae_weight_path checkpoints/dall_e \\
        --init_from checkpoints/beit_base_pt22k.safetensors --batch_size 64 --amp bf16
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from custom_datasets.collate import collate_skipping_bad
from custom_datasets.pretrain_data import SYNTHETIC, build_image_datasets
from engine_pretrain import StepSettings, evaluate, train_one_epoch
from models import create_model, list_models
from models.config import FFN_KINDS
from models.pretrained import describe, load_head_weights
from models.tasks import TASKS
from models.visual_tokenizers import KINDS as TOKENIZER_KINDS
from models.visual_tokenizers import create_visual_tokenizer
from util import distributed as dist_util
from util.checkpoint_io import read_checkpoint
from util.config_args import parse_with_config, plain, save_args
from util.errors import UserError, cli_entry
from util.run_checkpoint import latest_checkpoint, load_run_state, save_run_checkpoint
from util.visual_tokenizer_fitting import fit_kmeans_tokenizer, save_kmeans_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of flag values; explicit flags override it")
    p.add_argument("--exp_name", choices=sorted(TASKS), default="image_mim", help="pretraining mode")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list_models(), default="vlmo_tiny_patch16")
    g.add_argument("--init_from", help="start a new stage from this checkpoint's weights (converted BEiT, merged, or run)")
    g.add_argument("--resume", help="continue a run checkpoint; a weights-only checkpoint initialises the model")
    g.add_argument("--auto_resume", action="store_true", help="continue from the newest checkpoint in --output_dir")
    g.add_argument("--image_size", type=int, default=224)
    g.add_argument("--patch_size", type=int, default=None, help="default: the model's (16)")
    g.add_argument("--ffn", choices=FFN_KINDS, default=None, help="default: the checkpoint's, else shared")
    g.add_argument("--drop_path", type=float, default=0.1)
    g.add_argument("--layer_scale_init_value", type=float, default=None, help="default: the model's")
    g.add_argument("--grad_checkpointing", action="store_true", help="recompute activations to save memory")
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=SYNTHETIC, help="image folder (searched recursively), or 'synthetic'")
    g.add_argument("--eval_data_path", default=None, help="held-out images (default: a --val_fraction of --data_path)")
    g.add_argument("--val_fraction", type=float, default=0.05)
    g.add_argument("--bands", default=None, help="for .npy tiles: three band indices as R,G,B, e.g. 3,2,1")
    g.add_argument("--synthetic_train_size", type=int, default=2000)
    g.add_argument("--synthetic_val_size", type=int, default=500)
    g.add_argument("--synthetic_render_size", type=int, default=96)
    g.add_argument("--max_bad_samples", type=int, default=None, help="stop when more unreadable files than this were skipped")
    g.add_argument("--num_workers", type=int, default=2)
    g = p.add_argument_group("visual tokenizer (MIM targets)")
    g.add_argument("--d_vae_type", choices=TOKENIZER_KINDS, default="kmeans")
    g.add_argument("--d_vae_weight_path", default=None,
                   help="dall-e: folder with encoder.pkl; kmeans: a fitted .safetensors (omit to fit one now)")
    g.add_argument("--second_image_size", type=int, default=None, help="tokenizer view (default: image_size // 2)")
    g.add_argument("--visual_vocab_size", type=int, default=256, help="clusters when fitting a k-means tokenizer")
    g.add_argument("--tokenizer_fit_images", type=int, default=2000)
    g = p.add_argument_group("masking and augmentation")
    g.add_argument("--mask_strategy", choices=["block", "random"], default="block")
    g.add_argument("--num_mask_patches", type=int, default=None, help="default: 75/196 of the patches (BEiT)")
    g.add_argument("--max_mask_patches_per_block", type=int, default=None)
    g.add_argument("--min_mask_patches_per_block", type=int, default=16)
    g.add_argument("--mim_probability", type=float, default=0.55, help="with --mask_strategy random")
    g.add_argument("--min_crop_scale", type=float, default=0.08)
    g.add_argument("--color_jitter", type=float, default=0.4)
    g.add_argument("--imagenet_default_mean_and_std", action="store_true")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=64, help="per device")
    g.add_argument("--accum_iter", type=int, default=1)
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--blr", type=float, default=1.5e-3, help="lr = blr * effective batch / 256")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    g.add_argument("--min_lr", type=float, default=1e-5)
    g.add_argument("--warmup_epochs", type=float, default=1)
    g.add_argument("--warmup_steps", type=int, default=None, help="overrides --warmup_epochs")
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--opt_betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--clip_grad", type=float, default=3.0)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on GPU, none on CPU")
    g.add_argument("--output_dir", default=None, help="default: outputs/<exp_name>")
    g.add_argument("--log_dir", default=None, help="TensorBoard dir (default: --output_dir)")
    g.add_argument("--save_per_epochs", type=int, default=5)
    g.add_argument("--print_freq", type=int, default=20)
    g.add_argument("--eval", action="store_true", help="only evaluate the --resume / --init_from checkpoint")
    return p


def validate(args: argparse.Namespace) -> None:
    """Flag combinations a user can get wrong, checked before any expensive work."""
    if args.resume and args.init_from:
        raise UserError("--resume and --init_from both given; --resume continues a run, --init_from starts a new stage")
    if args.eval and not (args.resume or args.init_from):
        raise UserError("--eval needs a checkpoint: pass --resume or --init_from")
    if args.d_vae_type == "dall-e" and not args.d_vae_weight_path:
        raise UserError("--d_vae_type dall-e needs --d_vae_weight_path DIR holding OpenAI's encoder.pkl")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but no GPU is visible; use --device cpu")
    for flag in ("batch_size", "accum_iter", "epochs", "image_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    args.second_image_size = args.second_image_size or args.image_size // 2
    args.amp = args.amp or ("bf16" if args.device.startswith("cuda") else "none")
    args.output_dir = args.output_dir or f"outputs/{args.exp_name}"
    args.log_dir = args.log_dir or args.output_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_backbone(args: argparse.Namespace, weights: str | None):
    overrides = dict(img_size=args.image_size, patch_size=args.patch_size, drop_path_rate=args.drop_path,
                     layer_scale_init_value=args.layer_scale_init_value, ffn=args.ffn)
    if weights is None:
        return create_model(args.model, **overrides)
    return create_model(args.model, pretrained=weights, **{k: v for k, v in overrides.items()
                                                           if k in ("img_size", "drop_path_rate")})


def build_tokenizer(args, train_set, grid: int, device: torch.device):
    path = args.d_vae_weight_path
    if args.d_vae_type == "kmeans" and path is None:
        path = str(Path(args.output_dir) / "visual_tokenizer.safetensors")
        if dist_util.is_main_process() and not Path(path).exists():
            print(f"fitting a {args.visual_vocab_size}-token k-means visual tokenizer on up to "
                  f"{args.tokenizer_fit_images} training images ...", flush=True)
            start = time.time()
            tokenizer = fit_kmeans_tokenizer(train_set, grid, args.visual_vocab_size, args.tokenizer_fit_images,
                                             seed=args.seed, num_workers=args.num_workers)
            save_kmeans_tokenizer(tokenizer, path, args.second_image_size)
            print(f"saved {path} ({time.time() - start:.0f}s)", flush=True)
        dist_util.barrier()
        args.d_vae_weight_path = path
    tokenizer = create_visual_tokenizer(args.d_vae_type, path, args.second_image_size, expected_grid=grid)
    return tokenizer.to(device)


def make_loader(dataset, args, train: bool) -> DataLoader:
    sampler = (DistributedSampler(dataset, shuffle=train, seed=args.seed) if dist_util.is_distributed()
               else (torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed))
                     if train else None))
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      collate_fn=collate_skipping_bad, drop_last=train, pin_memory=args.device.startswith("cuda"),
                      persistent_workers=args.num_workers > 0)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No decay on norms, biases, tokens, position tables; only trainable parameters."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class BatchPreparer:
    """Moves a batch to the device and computes the MIM targets with the tokenizer (batched, no grad)."""

    def __init__(self, device: torch.device, tokenizer=None) -> None:
        self.device, self.tokenizer = device, tokenizer

    def __call__(self, batch: dict) -> dict:
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if self.tokenizer is not None and "tokenizer_image" in out:
            out["visual_token_ids"] = self.tokenizer.get_codebook_indices(out.pop("tokenizer_image"))
        return out


@torch.no_grad()
def majority_baseline(loader, prepare) -> float:
    """Accuracy of always predicting the most frequent visual token of masked patches."""
    counts: dict[int, int] = {}
    total = 0
    for batch in loader:
        batch.pop("num_skipped", None)
        if not batch:
            continue
        b = prepare(batch)
        ids = b["visual_token_ids"][b["bool_masked_pos"].bool()]
        for value, n in zip(*torch.unique(ids, return_counts=True)):
            counts[int(value)] = counts.get(int(value), 0) + int(n)
        total += ids.numel()
    return max(counts.values()) / total if total else 0.0


@cli_entry
def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_with_config(build_parser(), argv)
    validate(args)
    rank, world, local_rank = dist_util.init_distributed(args.device)
    device = torch.device(f"cuda:{local_rank}" if args.device.startswith("cuda") else args.device)
    seed_everything(args.seed + rank)
    output_dir = Path(args.output_dir)
    if args.auto_resume and not args.resume:
        found = latest_checkpoint(output_dir)
        args.resume = str(found) if found else None
    if not args.resume and not args.eval and latest_checkpoint(output_dir) is not None:
        raise UserError(f"--output_dir {output_dir} already holds checkpoints of a run; pass --auto_resume to continue "
                        f"it or choose another --output_dir (nothing is overwritten)")

    resume_state = None
    weights = args.init_from
    if args.resume:
        ckpt = read_checkpoint(args.resume)
        if "optimizer" in ckpt.extra:
            resume_state = args.resume
            weights = args.resume
            print(f"resuming run from {args.resume} (epoch {ckpt.extra.get('epoch')})")
        else:
            weights = args.resume
            print(f"--resume {args.resume} holds weights only: initialising the model from it (new run, epoch 0)")
    backbone = build_backbone(args, weights)
    grid = backbone.cfg.grid_size

    train_set, val_set = build_image_datasets(args, grid)
    tokenizer = build_tokenizer(args, train_set, grid[0], device)
    task = TASKS[args.exp_name](backbone, tokenizer.vocab_size)
    if weights and load_head_weights(task.mim_head, read_checkpoint(weights), "mim_head"):
        print(f"loaded the MIM head from {weights}")
    for name, param in task.named_parameters():
        if name in set(task.frozen_parameter_names()):
            param.requires_grad_(False)
    if args.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    task.to(device)
    model = task
    if dist_util.is_distributed():
        model = torch.nn.parallel.DistributedDataParallel(task, device_ids=[local_rank] if device.type == "cuda" else None)

    train_loader, val_loader = make_loader(train_set, args, True), make_loader(val_set, args, False)
    if len(train_loader) == 0:
        raise UserError(f"{len(train_set)} training images are fewer than one batch of {args.batch_size} per device; "
                        f"lower --batch_size")
    eff_batch = args.batch_size * args.accum_iter * world
    lr = args.lr or args.blr * eff_batch / 256
    warmup = args.warmup_steps / len(train_loader) if args.warmup_steps is not None else args.warmup_epochs
    optimizer = torch.optim.AdamW(param_groups(task, args.weight_decay), lr=lr, betas=tuple(args.opt_betas))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    start_epoch = load_run_state(resume_state, task, optimizer, scaler) if resume_state else 0
    prepare = BatchPreparer(device, tokenizer)
    n_train = sum(p.numel() for p in task.parameters() if p.requires_grad)
    if dist_util.is_main_process():
        print(f"{args.exp_name}: {args.model} ({describe(backbone.cfg)}), {n_train / 1e6:.2f}M trainable parameters")
        print(f"data: {args.data_path} ({len(train_set)} train / {len(val_set)} val), tokenizer {args.d_vae_type} "
              f"({tokenizer.vocab_size} tokens), {world} process(es), effective batch {eff_batch}, lr {lr:.3g}, "
              f"amp {args.amp}, device {device}")
        save_args(args, output_dir)

    if args.eval:
        seed_everything(args.seed + rank)  # held-out masks are the same in every evaluation
        stats = evaluate(model, val_loader, device, prepare, amp_dtype)
        if dist_util.is_main_process():
            print("eval: " + json.dumps({k: round(v, 4) for k, v in stats.items()}))
        return stats

    log_writer = None
    if dist_util.is_main_process():
        from torch.utils.tensorboard import SummaryWriter

        log_writer = SummaryWriter(log_dir=args.log_dir)
    settings = StepSettings(lr=lr, min_lr=args.min_lr, warmup_epochs=warmup, epochs=args.epochs,
                            accum_iter=args.accum_iter, clip_grad=args.clip_grad, amp_dtype=amp_dtype,
                            print_freq=args.print_freq, max_bad_samples=args.max_bad_samples)
    skipped_total, stats = 0, {}
    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        # data order, augmentation and masks are functions of (seed, rank, epoch): a resumed run
        # continues exactly where a straight run would be
        seed_everything(args.seed + rank + 1000 * epoch)
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        else:
            train_loader.sampler.generator.manual_seed(args.seed + epoch)
        train_stats = train_one_epoch(model, train_loader, optimizer, device, epoch, settings, prepare, scaler,
                                      log_writer, skipped_total)
        skipped_total += int(train_stats.get("skipped_samples", 0))
        seed_everything(args.seed + rank)  # held-out masks are the same in every evaluation
        test_stats = evaluate(model, val_loader, device, prepare, amp_dtype)
        stats = {**{f"train_{k}": v for k, v in train_stats.items()}, **{f"test_{k}": v for k, v in test_stats.items()},
                 "epoch": epoch, "n_parameters": n_train}
        last = epoch + 1 == args.epochs
        if dist_util.is_main_process():
            if (epoch + 1) % args.save_per_epochs == 0 or last:
                path = save_run_checkpoint(output_dir, epoch, (epoch + 1) * len(train_loader), task, optimizer, scaler,
                                           backbone.cfg.to_dict(), plain(vars(args)))
                print(f"saved {path}")
            for key, value in test_stats.items():
                log_writer.add_scalar(f"test/{key}", value, epoch)
            with open(output_dir / "log.txt", "a") as f:
                f.write(json.dumps(stats) + "\n")
            print(f"epoch {epoch}: " + "  ".join(f"{k} {v:.4g}" for k, v in test_stats.items())
                  + (f"  (skipped {int(train_stats['skipped_samples'])} unreadable samples)"
                     if train_stats.get("skipped_samples") else ""), flush=True)
    if dist_util.is_main_process() and stats:
        baseline = majority_baseline(val_loader, prepare)
        print(f"done in {time.time() - start:.0f}s: held-out MIM accuracy {stats.get('test_acc_mim', 0):.3f} "
              f"(always predicting the most frequent token: {baseline:.3f}; uniform chance: {1 / tokenizer.vocab_size:.4f})")
        stats["majority_baseline"] = baseline
        log_writer.close()
    dist_util.cleanup()
    return stats


if __name__ == "__main__":
    main()
