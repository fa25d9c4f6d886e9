"""Downstream modes on the pretrained backbone.

    python main_finetune.py --task image_classification --data_path ../shared/data/hymenoptera \\
        --finetune outputs/demo_image_mim/checkpoint-11.pth --input_size 64 --epochs 30
    python main_finetune.py --task linear_probe --data_path /data/imagenet --finetune merged_model.safetensors
    torchrun --nproc_per_node 8 main_finetune.py --task image_classification --model vlmo_base_patch16 \\
        --finetune checkpoints/beit_base_pt22k.safetensors --data_path /data/imagenet --batch_size 128 \\
        --blr 5e-4 --layer_decay 0.65 --epochs 100 --warmup_epochs 20 --drop_path 0.1 --mixup 0.8 --cutmix 1.0 \\
        --reprob 0.25 --smoothing 0.1 --aa rand-m9-mstd0.5-inc1 --amp bf16 --model_ema
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from custom_datasets.classification_data import build_classification_datasets
from custom_datasets.collate import collate_skipping_bad
from engine_finetune import evaluate, train_one_epoch
from engine_pretrain import StepSettings
from main_pretrain_cook import seed_everything
from models import create_model, list_models
from models.classifier import ImageClassifier, TextClassifier
from models.pretrained import check_text_vocab, describe, load_head_weights
from models.tasks.base import unused_parameter_names
from util import distributed as dist_util
from util.checkpoint_io import read_checkpoint
from util.config_args import check_run_flags, parse_with_config, plain, save_args
from util.errors import UserError, cli_entry
from util.linear_probe import run_linear_probe
from util.run_checkpoint import save_run_checkpoint

TASKS = ("image_classification", "linear_probe", "image_text_retrieval", "text_classification")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of flag values; explicit flags override it")
    p.add_argument("--task", choices=TASKS, required=True)
    g = p.add_argument_group("model")
    g.add_argument("--finetune", help="checkpoint of any stage (run, merged or converted BEiT); omit for random init")
    g.add_argument("--model", choices=list_models(), default=None,
                   help="variant (default: the checkpoint's architecture, or vlmo_tiny_patch16 from scratch)")
    g.add_argument("--patch_size", type=int, default=None, help="from scratch only (default: the model's)")
    g.add_argument("--input_size", type=int, default=224, help="resolution; position tables are interpolated")
    g.add_argument("--nb_classes", type=int, default=None, help="default: the number of class folders")
    g.add_argument("--use_cls", action="store_true", help="classify the [CLS] feature instead of mean pooling")
    g.add_argument("--drop_path", type=float, default=0.1)
    g.add_argument("--layer_decay", type=float, default=0.65, help="layer-wise lr decay (1.0: off)")
    g.add_argument("--probe_layer", type=int, default=None, help="linear_probe: block whose output is probed (default: last)")
    g = p.add_argument_group("data and augmentation")
    g.add_argument("--data_path", default=None,
                   help="image tasks: folder with train/<class>/ and val/<class>/; retrieval: the image root")
    g.add_argument("--data_file_path", default=None,
                   help="text_classification: .csv/.json/.jsonl of text,label; retrieval: image-caption .json")
    g.add_argument("--eval_data_file_path", default=None, help="held-out texts / pairs (default: --val_fraction)")
    g.add_argument("--val_fraction", type=float, default=0.1)
    g.add_argument("--tokenizer", default=None, help="text tasks: BERT tokenizer folder or hub name (default bert-base-uncased)")
    g.add_argument("--max_text_len", type=int, default=40)
    g.add_argument("--eval_data_path", default=None, help="held-out folder (default: DATA_PATH/val)")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm RandAugment policy ('' for none)")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--mixup", type=float, default=0.8)
    g.add_argument("--cutmix", type=float, default=1.0)
    g.add_argument("--mixup_prob", type=float, default=1.0)
    g.add_argument("--mixup_switch_prob", type=float, default=0.5)
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--crop_pct", type=float, default=0.875)
    g.add_argument("--imagenet_default_mean_and_std", action="store_true")
    g.add_argument("--max_bad_samples", type=int, default=None)
    g.add_argument("--num_workers", type=int, default=2)
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=64, help="per device")
    g.add_argument("--accum_iter", "--update_freq", type=int, default=1, dest="accum_iter")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--blr", type=float, default=None,
                   help="lr = blr * effective batch / 256 (default: 5e-4 fine-tuning, 0.1 linear probing)")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min_lr", type=float, default=1e-6)
    g.add_argument("--warmup_epochs", type=float, default=5)
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--clip_grad", type=float, default=None)
    g.add_argument("--model_ema", action="store_true")
    g.add_argument("--model_ema_decay", type=float, default=0.9999)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on GPU, none on CPU")
    g.add_argument("--output_dir", default=None, help="default: outputs/finetune_<task>")
    g.add_argument("--log_dir", default=None)
    g.add_argument("--print_freq", type=int, default=20)
    g.add_argument("--eval", action="store_true", help="only evaluate --finetune (a checkpoint with its classifier)")
    return p


def validate(args: argparse.Namespace) -> None:
    if args.eval and not args.finetune:
        raise UserError("--eval needs --finetune CKPT (a fine-tuned checkpoint with its classifier)")
    check_run_flags(args, ("batch_size", "accum_iter", "epochs", "input_size"))
    if not 0 < args.layer_decay <= 1:
        raise UserError("--layer_decay must be in (0, 1]")
    needs = {"image_classification": "data_path", "linear_probe": "data_path", "text_classification": "data_file_path",
             "image_text_retrieval": "data_file_path"}[args.task]
    if not getattr(args, needs):
        raise UserError(f"--task {args.task} needs --{needs}")
    args.blr = args.blr if args.blr is not None else (0.1 if args.task == "linear_probe" else 5e-4)
    args.output_dir = args.output_dir or f"outputs/finetune_{args.task}"
    args.log_dir = args.log_dir or args.output_dir


def build_classifier(args: argparse.Namespace, num_classes: int, vocab_size: int | None = None) -> tuple[nn.Module, list[str]]:
    """The task's classifier (image, or text when `vocab_size` is given) and a report of what was
    loaded, new and ignored."""
    def make(backbone):
        return TextClassifier(backbone, num_classes) if vocab_size else ImageClassifier(backbone, num_classes, args.use_cls)

    if args.finetune is None:
        backbone = create_model(args.model or "vlmo_tiny_patch16", img_size=args.input_size, patch_size=args.patch_size,
                                drop_path_rate=args.drop_path, **({"vocab_size": vocab_size} if vocab_size else {}))
        return make(backbone), ["random init (no --finetune)"]
    ckpt = read_checkpoint(args.finetune)
    check_text_vocab(ckpt, vocab_size, args.tokenizer)
    backbone = create_model(args.model, pretrained=args.finetune, checkpoint=ckpt, img_size=args.input_size,
                            drop_path_rate=args.drop_path)
    model = make(backbone)
    loaded, new = [f"backbone ({sum(1 for k in ckpt.model if k.startswith('backbone.'))} tensors)"], []
    for head in ("pooler_norm", "classifier"):
        module = getattr(model, head)
        saved = ckpt.model.get(f"{head}.weight")
        if saved is not None and saved.shape == getattr(module, "weight", saved).shape and load_head_weights(module, ckpt, head):
            loaded.append(head)
        elif any(p.numel() for p in module.parameters()):
            new.append(head + (f" (checkpoint has {saved.shape[0]} classes)" if saved is not None and head == "classifier"
                               else ""))
    ignored = sorted({k.split(".")[0] for k in ckpt.model} - {"backbone", "pooler_norm", "classifier"})
    return model, [f"loaded: {', '.join(loaded)}", f"new: {', '.join(new) or 'none'}",
                   f"ignored: {', '.join(ignored) or 'none'}"]


@dataclass
class Downstream:
    """Everything the shared training loop needs for one classification task."""

    train: Dataset
    val: Dataset
    collate: Callable
    model: nn.Module
    report: list[str]
    class_names: list[str]
    input_keys: tuple[str, ...]
    mixup: bool


def setup_image_classification(args: argparse.Namespace) -> Downstream:
    train_set, val_set = build_classification_datasets(args)
    num_classes = args.nb_classes or len(train_set.class_to_idx)
    if num_classes < len(train_set.class_to_idx):
        raise UserError(f"--nb_classes {num_classes} is fewer than the {len(train_set.class_to_idx)} class folders")
    model, report = build_classifier(args, num_classes)
    names = sorted(train_set.class_to_idx, key=train_set.class_to_idx.get)
    return Downstream(train_set, val_set, collate_skipping_bad, model, report, names, ("images",), True)


def setup_text_classification(args: argparse.Namespace) -> Downstream:
    from custom_datasets.labelled_text import LabelledTexts, label_index, read_labelled_texts
    from custom_datasets.pretrain_data import _is_val_file
    from custom_datasets.text_collate import CaptionCollator
    from models.text_tokenizer import load_text_tokenizer

    examples = read_labelled_texts(args.data_file_path)
    if args.eval_data_file_path:
        train, val = examples, read_labelled_texts(args.eval_data_file_path)
    else:
        held = [_is_val_file(f"example{i}", args.val_fraction) for i in range(len(examples))]
        train = [e for e, h in zip(examples, held) if not h]
        val = [e for e, h in zip(examples, held) if h] or examples[:1]
    labels = label_index(train)
    num_classes = args.nb_classes or len(labels)
    args.tokenizer = args.tokenizer or "bert-base-uncased"
    tokenizer = load_text_tokenizer(args.tokenizer)
    model, report = build_classifier(args, num_classes, vocab_size=len(tokenizer))
    names = sorted(labels, key=labels.get)
    collate = CaptionCollator(tokenizer, args.max_text_len, None, train=False)
    return Downstream(LabelledTexts(train, labels), LabelledTexts(val, labels), collate, model, report, names,
                      ("input_ids", "attention_mask"), False)


def run_retrieval(args: argparse.Namespace) -> dict:
    """ITC fine-tuning on image-caption pairs with the full backbone, evaluated by R@1/5/10 in both
    directions with every caption of an image counted (the pretraining engine's image_text_itc mode)."""
    from main_pretrain_cook import main as pretrain

    argv = ["--exp_name", "image_text_itc", "--data_file_path", args.data_file_path, "--image_size", str(args.input_size),
            "--epochs", str(args.epochs), "--batch_size", str(args.batch_size), "--accum_iter", str(args.accum_iter),
            "--blr", str(args.blr), "--min_lr", str(args.min_lr), "--warmup_epochs", str(args.warmup_epochs),
            "--weight_decay", str(args.weight_decay), "--drop_path", str(args.drop_path), "--seed", str(args.seed),
            "--device", args.device, "--amp", args.amp, "--num_workers", str(args.num_workers), "--output_dir",
            args.output_dir, "--max_text_len", str(args.max_text_len), "--val_fraction", str(args.val_fraction),
            "--print_freq", str(args.print_freq), "--tokenizer", args.tokenizer or "bert-base-uncased"]
    argv += ["--data_path", args.data_path] if args.data_path else []
    argv += ["--eval_data_file_path", args.eval_data_file_path] if args.eval_data_file_path else []
    argv += ["--clip_grad", str(args.clip_grad)] if args.clip_grad else []
    if args.finetune:
        argv += ["--init_from", args.finetune] + (["--model", args.model] if args.model else [])
    else:
        argv += ["--model", args.model or "vlmo_tiny_patch16"] + (["--patch_size", str(args.patch_size)] if args.patch_size else [])
    stats = pretrain(argv + (["--eval"] if args.eval else []))
    return stats.get("stage_report", stats)


def make_loader(dataset, args, train: bool, collate) -> DataLoader:
    sampler = DistributedSampler(dataset, shuffle=train, seed=args.seed) if dist_util.is_distributed() else None
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, shuffle=train and sampler is None,
                      num_workers=args.num_workers, collate_fn=collate, drop_last=train,
                      pin_memory=args.device.startswith("cuda"), persistent_workers=args.num_workers > 0)


def layer_decay_groups(model: ImageClassifier, args: argparse.Namespace) -> list[dict]:
    from timm.optim import param_groups_layer_decay

    return param_groups_layer_decay(model, weight_decay=args.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=args.layer_decay)


@cli_entry
def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_with_config(build_parser(), argv)
    validate(args)
    rank, world, local_rank = dist_util.init_distributed(args.device)
    device = torch.device(f"cuda:{local_rank}" if args.device.startswith("cuda") else args.device)
    seed_everything(args.seed + rank)
    output_dir = Path(args.output_dir)
    if not args.eval and (output_dir / "log.txt").exists():
        raise UserError(f"--output_dir {output_dir} already holds a run (log.txt); choose another --output_dir "
                        f"(nothing is overwritten)")
    if args.task == "linear_probe":
        return run_linear_probe(args, device)
    if args.task == "image_text_retrieval":
        return run_retrieval(args)

    task = setup_text_classification(args) if args.task == "text_classification" else setup_image_classification(args)
    model, train_set, val_set, keys = task.model, task.train, task.val, task.input_keys
    num_classes = model.classifier.out_features
    paths = {"text"} if args.task == "text_classification" else {"image"}
    unused = set(unused_parameter_names(model, paths))
    if isinstance(model, ImageClassifier) and not model.use_cls:  # mean pooling skips the final norm (as BEiT)
        unused |= {n for n, _ in model.named_parameters() if n.startswith("backbone.norm.")}
    for name, param in model.named_parameters():  # paths the task never takes get no gradient (DDP needs all)
        if name in unused:
            param.requires_grad_(False)
    model.to(device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    val_loader = make_loader(val_set, args, False, task.collate)
    if dist_util.is_main_process():
        print(f"{args.task}: {describe(model.backbone.cfg)}, {num_classes} classes "
              f"({len(train_set)} train / {len(val_set)} val examples); " + "; ".join(task.report))
        output_dir.mkdir(parents=True, exist_ok=True)
        save_args(args, output_dir, "eval_args.yaml" if args.eval else "args.yaml")
    if args.eval:
        stats = evaluate(model, val_loader, device, amp_dtype, keys)
        if dist_util.is_main_process():
            print(f"eval: acc1 {stats['acc1']:.2f}  acc5 {stats['acc5']:.2f}  loss {stats['loss']:.4f}")
        return stats

    ddp = model
    if dist_util.is_distributed():
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    train_loader = make_loader(train_set, args, True, task.collate)
    if len(train_loader) == 0:
        raise UserError(f"{len(train_set)} training images are fewer than one batch of {args.batch_size}; lower --batch_size")
    eff_batch = args.batch_size * args.accum_iter * world
    lr = args.lr or args.blr * eff_batch / 256
    optimizer = torch.optim.AdamW(layer_decay_groups(model, args), lr=lr)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    mixup_fn = None
    if task.mixup and (args.mixup > 0 or args.cutmix > 0):
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing, num_classes=num_classes)
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    criterion = (SoftTargetCrossEntropy() if mixup_fn else LabelSmoothingCrossEntropy(args.smoothing)
                 if args.smoothing > 0 else torch.nn.CrossEntropyLoss())
    model_ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3

        model_ema = ModelEmaV3(model, decay=args.model_ema_decay)
    settings = StepSettings(lr=lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, epochs=args.epochs,
                            accum_iter=args.accum_iter, clip_grad=args.clip_grad, amp_dtype=amp_dtype,
                            print_freq=args.print_freq, max_bad_samples=args.max_bad_samples)
    log_writer = None
    if dist_util.is_main_process():
        from torch.utils.tensorboard import SummaryWriter

        log_writer = SummaryWriter(log_dir=args.log_dir)
        print(f"effective batch {eff_batch}, lr {lr:.3g}, layer decay {args.layer_decay}, mixup {args.mixup}, "
              f"cutmix {args.cutmix}, smoothing {args.smoothing}, ema {args.model_ema}, amp {args.amp}, device {device}")
    best, stats, skipped, start = -1.0, {}, 0, time.time()
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for epoch in range(args.epochs):
        seed_everything(args.seed + rank + 1000 * epoch)
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(ddp, criterion, train_loader, optimizer, device, epoch, settings, mixup_fn,
                                      model_ema, scaler, log_writer, skipped, keys)
        skipped += int(train_stats["skipped_samples"])
        test_stats = evaluate(model, val_loader, device, amp_dtype, keys)
        stats = {**{f"train_{k}": v for k, v in train_stats.items()}, **{f"test_{k}": v for k, v in test_stats.items()},
                 "epoch": epoch, "n_parameters": n_parameters}
        if model_ema is not None:
            ema_stats = evaluate(model_ema.module, val_loader, device, amp_dtype, keys)
            stats.update({f"test_ema_{k}": v for k, v in ema_stats.items()})
        if dist_util.is_main_process():
            if test_stats["acc1"] > best:
                best = test_stats["acc1"]
                save_run_checkpoint(output_dir, epoch, (epoch + 1) * len(train_loader), model, optimizer, scaler,
                                    model.backbone.cfg.to_dict(), plain(vars(args)),
                                    {"num_classes": num_classes, "test_acc1": best,
                                     "class_names": task.class_names, "task": args.task},
                                    name="best")
            log_writer.add_scalar("test/acc1", test_stats["acc1"], epoch)
            log_writer.add_scalar("test/acc5", test_stats["acc5"], epoch)
            log_writer.add_scalar("test/loss", test_stats["loss"], epoch)
            with open(output_dir / "log.txt", "a") as f:
                f.write(json.dumps(stats) + "\n")
            print(f"epoch {epoch}: test acc1 {test_stats['acc1']:.2f}  acc5 {test_stats['acc5']:.2f}  "
                  f"loss {test_stats['loss']:.4f}  (best acc1 {best:.2f})", flush=True)
    if dist_util.is_main_process():
        print(f"done in {time.time() - start:.0f}s: best test acc1 {best:.2f}; saved {output_dir / 'checkpoint-best.pth'}")
        stats["best_acc1"] = best
        log_writer.close()
    dist_util.cleanup()
    return stats


if __name__ == "__main__":
    main()
