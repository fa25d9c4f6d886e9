"""Continual pretraining of the shared backbone: image MIM, text MLM, image-text contrastive and
their compound, the later stages through LoRA adapters with self-regularization.

    python main_pretrain_cook.py --config configs/demo_image_mim.yaml          # laptop demo, synthetic data
    torchrun --nproc_per_node 8 main_pretrain_cook.py --exp_name image_mim --model vlmo_base_patch16 \\
        --data_path /data/imagenet/train --d_vae_type dall-e --d_vae_weight_path checkpoints/dall_e \\
        --init_from checkpoints/beit_base_pt22k.safetensors --batch_size 64 --amp bf16
    torchrun --nproc_per_node 8 main_pretrain_cook.py --exp_name text_mlm --data_file_path cc3m.json \\
        --tokenizer bert-base-uncased --init_from outputs/image_mim/checkpoint-299.pth \\
        --lora_rank 64 --self_regularization --reg_loss_weight 1.0 --save_merged_lora_model
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Subset

from custom_datasets.pretrain_data import SYNTHETIC, build_pretrain_data
from engine_pretrain import StepSettings, evaluate, train_one_epoch
from models import create_model, list_models
from models.config import FFN_KINDS
from models.lora import add_lora, self_regularization
from models.pretrained import check_text_vocab, describe, load_head_weights
from models.tasks import TASKS, TaskOptions
from models.text_tokenizer import load_text_tokenizer
from models.trainability import configure_trainable
from models.visual_tokenizers import KINDS as TOKENIZER_KINDS
from models.visual_tokenizers import create_visual_tokenizer
from util import distributed as dist_util
from util.checkpoint_io import Checkpoint, read_checkpoint
from util.config_args import check_run_flags, parse_with_config, plain, save_args
from util.errors import UserError, cli_entry
from util.lora_checkpoints import save_adapters, save_merged_model
from util.run_checkpoint import latest_checkpoint, load_run_state, save_run_checkpoint
from util.stage_eval import build_probes, format_report, stage_report
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
    g.add_argument("--max_train_samples", type=int, default=None, help="use only the first N training samples (quick trials)")
    g.add_argument("--max_val_samples", type=int, default=None, help="use only the first N held-out samples")
    g.add_argument("--max_bad_samples", type=int, default=None, help="stop when more unreadable files than this were skipped")
    g.add_argument("--num_workers", type=int, default=2)
    g = p.add_argument_group("text")
    g.add_argument("--tokenizer", default=None,
                   help="BERT WordPiece tokenizer: local folder or hub name (default for text modes: bert-base-uncased)")
    g.add_argument("--data_file_path", nargs="+", default=None,
                   help="captions (.json list / .jsonl / .txt) or image-text pairs (.json/.jsonl with filename); "
                        "default: the synthetic world")
    g.add_argument("--eval_data_file_path", default=None, help="held-out captions / pairs (default: --val_fraction)")
    g.add_argument("--webdataset", action="store_true",
                   help="image-text pairs from WebDataset tar shards: --data_path DIR, glob or shards/{00000..00099}.tar")
    g.add_argument("--train_num_samples", type=int, default=None, help="pairs in the --webdataset shards (epoch length)")
    g.add_argument("--max_text_len", type=int, default=40, help="tokens per caption, [CLS] and [SEP] included")
    g.add_argument("--max_text_len_of_initckpt", type=int, default=196, help="text positions of a model built from scratch")
    g.add_argument("--mlm_probability", type=float, default=0.15)
    g = p.add_argument_group("image-text contrastive and compound")
    g.add_argument("--aggregate_itc", action=argparse.BooleanOptionalAction, default=True,
                   help="ITC negatives from every rank (gathered with gradients)")
    g.add_argument("--mim_conduct_prob", type=float, default=0.3)
    g.add_argument("--mlm_conduct_prob", type=float, default=0.8)
    g.add_argument("--itc_conduct_prob", type=float, default=1.0)
    g = p.add_argument_group("LoRA and self-regularization")
    g.add_argument("--lora_rank", type=int, default=0, help="0: train the backbone fully")
    g.add_argument("--lora_alpha", type=float, default=None, help="default: --lora_rank (scaling 1)")
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument("--trainable_extra", nargs="*", default=[], help="glob patterns of base parameters to train too")
    g.add_argument("--self_regularization", action="store_true", help="add λ·Σ||W ⊙ ΔW||² (needs --lora_rank)")
    g.add_argument("--reg_loss_weight", type=float, default=1.0, help="λ")
    g.add_argument("--save_merged_lora_model", action="store_true",
                   help="at the end write merged_model.safetensors (adapters merged, for the next stage)")
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
    if args.exp_name == "image_mim" and args.lora_rank:
        raise UserError("--lora_rank is for the continual stages (text_mlm, image_text_itc, compound_pretrain); "
                        "image_mim trains the backbone fully; drop --lora_rank")
    if args.self_regularization and not args.lora_rank:
        raise UserError("--self_regularization regularizes LoRA updates; add --lora_rank R (e.g. 64)")
    if args.save_merged_lora_model and not args.lora_rank:
        raise UserError("--save_merged_lora_model needs --lora_rank; a full run's checkpoint is already a plain model")
    if args.lora_rank < 0 or (args.lora_alpha is not None and args.lora_alpha <= 0):
        raise UserError("--lora_rank must be >= 0 and --lora_alpha > 0")
    if not 1 < args.max_text_len <= args.max_text_len_of_initckpt:
        raise UserError(f"--max_text_len {args.max_text_len} must be between 2 and --max_text_len_of_initckpt "
                        f"{args.max_text_len_of_initckpt}")
    if args.webdataset and TASKS[args.exp_name].data_kind != "pair":
        raise UserError(f"--webdataset holds image-text pairs; {args.exp_name} does not read pairs (use image_text_itc "
                        f"or compound_pretrain)")
    if args.webdataset and TASKS[args.exp_name].needs_visual_tokens and args.d_vae_weight_path is None:
        raise UserError("--webdataset streams its data, so a k-means tokenizer cannot be fitted on it here; fit one "
                        "first with util/fit_visual_tokenizer.py and pass --d_vae_weight_path")
    if not 0 < args.mlm_probability < 1:
        raise UserError("--mlm_probability must be between 0 and 1")
    check_run_flags(args, ("batch_size", "accum_iter", "epochs", "image_size"))
    args.lora_alpha = args.lora_alpha or args.lora_rank
    args.second_image_size = args.second_image_size or args.image_size // 2
    args.output_dir = args.output_dir or f"outputs/{args.exp_name}"
    args.log_dir = args.log_dir or args.output_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_backbone(args: argparse.Namespace, weights: str | None, ckpt: Checkpoint | None, vocab_size: int | None):
    overrides = dict(img_size=args.image_size, patch_size=args.patch_size, drop_path_rate=args.drop_path,
                     layer_scale_init_value=args.layer_scale_init_value, ffn=args.ffn, vocab_size=vocab_size,
                     max_text_len=args.max_text_len_of_initckpt)
    if weights is None:
        return create_model(args.model, **overrides)
    check_text_vocab(ckpt, vocab_size, args.tokenizer)
    return create_model(args.model, pretrained=weights, checkpoint=ckpt,
                        **{k: v for k, v in overrides.items() if k in ("img_size", "drop_path_rate")})


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


def make_loader(dataset, args, train: bool, collate) -> DataLoader:
    if isinstance(dataset, IterableDataset):  # streams split and shuffle themselves (set_epoch)
        return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate,
                          drop_last=train, pin_memory=args.device.startswith("cuda"))
    sampler = (DistributedSampler(dataset, shuffle=train, seed=args.seed) if dist_util.is_distributed()
               else (torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed))
                     if train else None))
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      collate_fn=collate, drop_last=train, pin_memory=args.device.startswith("cuda"),
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
    """Moves the tensors a mode needs to the device and computes MIM targets with the visual
    tokenizer (batched, no grad)."""

    def __init__(self, device: torch.device, keys: tuple[str, ...], tokenizer=None) -> None:
        self.device, self.keys, self.tokenizer = device, set(keys) | {"label"}, tokenizer

    def __call__(self, batch: dict) -> dict:
        wanted = self.keys | ({"tokenizer_image"} if self.tokenizer is not None else set())
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()
               if isinstance(v, torch.Tensor) and k in wanted}
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


def resolve_weights(args: argparse.Namespace) -> tuple[str | None, Checkpoint | None, bool]:
    """(weights path, its checkpoint read once, whether it is a run to continue); says which happens."""
    if not args.resume:
        if args.init_from:
            print(f"starting a new stage from the weights of {args.init_from} (fresh optimizer, epoch 0)")
            return args.init_from, read_checkpoint(args.init_from), False
        return None, None, False
    ckpt = read_checkpoint(args.resume)
    if "optimizer" in ckpt.extra:
        print(f"resuming run from {args.resume} (epoch {ckpt.extra.get('epoch')})")
        saved = ckpt.extra.get("lora") or {}
        if saved and not args.lora_rank:  # a LoRA run continues (or is evaluated) as a LoRA run
            args.lora_rank, args.lora_alpha = saved["rank"], saved["alpha"]
            print(f"{args.resume} trained LoRA adapters: using --lora_rank {args.lora_rank} --lora_alpha {args.lora_alpha:g}")
        elif saved.get("rank", 0) != args.lora_rank:
            raise UserError(f"--resume {args.resume} was trained with --lora_rank {saved.get('rank', 0)}, not "
                            f"{args.lora_rank}; resume with the run's own flags, or use --init_from to start a new stage")
        return args.resume, ckpt, True
    print(f"--resume {args.resume} holds weights only: initialising the model from it (new run, epoch 0)")
    return args.resume, ckpt, False


def attach_heads(task, ckpt: Checkpoint | None) -> dict[str, torch.Tensor]:
    """Load the mode's heads that `ckpt` has; return the other non-backbone tensors it carries
    (heads of earlier stages), which this run keeps in its checkpoints for later stages."""
    if ckpt is None:
        return {}
    new = []
    for head in task.heads:
        if load_head_weights(getattr(task, head), ckpt, head):
            print(f"loaded the {head} from {ckpt.path}")
        else:
            new.append(head)
    owned = set(task.heads) | {"backbone"}
    carried = {k: v for k, v in ckpt.model.items() if k.split(".")[0] not in owned and ".lora_" not in k}
    print(f"from {ckpt.path}: backbone loaded; new heads: {', '.join(new) or 'none'}; kept unused for later stages: "
          f"{', '.join(sorted({k.split('.')[0] for k in carried})) or 'none'}")
    return carried


def build_text_tokenizer(args, task_cls):
    if task_cls.data_kind == "image" and args.tokenizer is None:
        return None
    args.tokenizer = args.tokenizer or "bert-base-uncased"
    return load_text_tokenizer(args.tokenizer)


def report_stage(args, task, backbone, data, grid, carried, visual_tokenizer, text_tokenizer, device,
                 output_dir: Path, name: str = "stage_report.json") -> dict:
    """The forgetting / transfer metrics of this backbone on held-out probes, printed and saved."""
    if visual_tokenizer is None and args.d_vae_weight_path:  # the MIM probe of a stage that does not train MIM
        visual_tokenizer = create_visual_tokenizer(args.d_vae_type, args.d_vae_weight_path, args.second_image_size,
                                                   expected_grid=grid[0]).to(device)
    heads = {**{k: v for k, v in task.state_dict().items() if not k.startswith("backbone.")},
             **{k: v.to(device) for k, v in carried.items()}}
    probes = build_probes(args, task.data_kind, grid, text_tokenizer, data.val, data.val_collate,
                          limit=args.max_val_samples or 500)
    report = stage_report(backbone, heads, probes, device, visual_tokenizer, text_tokenizer, args.max_text_len,
                          args.batch_size, args.seed)
    print(f"stage report ({args.exp_name}): {format_report(report)}")
    (output_dir / name).write_text(json.dumps(report, indent=1))
    return report


def finish_lora_stage(args, task, backbone, output_dir: Path, carried: dict[str, torch.Tensor]) -> None:
    lora = {"rank": args.lora_rank, "alpha": args.lora_alpha}
    state = {**{k: v.detach().cpu() for k, v in task.state_dict().items()}, **carried}
    save_adapters(output_dir / "adapters.safetensors", state, backbone.cfg.to_dict(), lora)
    print(f"saved {output_dir / 'adapters.safetensors'} (adapter weights only)")
    if args.save_merged_lora_model:
        path = output_dir / "merged_model.safetensors"
        save_merged_model(path, state, backbone.cfg.to_dict(), lora, str(output_dir))
        print(f"saved {path} (adapters merged; start the next stage with --init_from {path})")


@cli_entry
def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_with_config(build_parser(), argv)
    validate(args)
    task_cls = TASKS[args.exp_name]
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

    weights, weights_ckpt, continue_run = resolve_weights(args)
    text_tokenizer = build_text_tokenizer(args, task_cls)
    backbone = build_backbone(args, weights, weights_ckpt, len(text_tokenizer) if text_tokenizer is not None else None)
    if args.max_text_len > backbone.cfg.max_text_len:
        raise UserError(f"--max_text_len {args.max_text_len} exceeds the model's {backbone.cfg.max_text_len} text positions")
    grid = backbone.cfg.grid_size
    data = build_pretrain_data(args, task_cls.data_kind, grid, text_tokenizer, task_cls.needs_mlm_masks)
    if args.max_train_samples and not isinstance(data.train, IterableDataset):
        data.train = Subset(data.train, range(min(args.max_train_samples, len(data.train))))
    if args.max_val_samples and not isinstance(data.val, IterableDataset):
        data.val = Subset(data.val, range(min(args.max_val_samples, len(data.val))))
    tokenizer = build_tokenizer(args, data.train, grid[0], device) if task_cls.needs_visual_tokens else None
    options = TaskOptions(visual_vocab_size=tokenizer.vocab_size if tokenizer is not None else None,
                          gather=dist_util.gather_with_grad if args.aggregate_itc else (lambda x: x),
                          mim_conduct_prob=args.mim_conduct_prob, mlm_conduct_prob=args.mlm_conduct_prob,
                          itc_conduct_prob=args.itc_conduct_prob, seed=args.seed)
    task = task_cls(backbone, options)
    carried = attach_heads(task, weights_ckpt)
    if args.lora_rank:
        add_lora(backbone, args.lora_rank, args.lora_alpha, args.lora_dropout)
    trainable = configure_trainable(task, bool(args.lora_rank), args.trainable_extra)
    if args.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    task.to(device)
    model = task
    if dist_util.is_distributed():
        model = torch.nn.parallel.DistributedDataParallel(task, device_ids=[local_rank] if device.type == "cuda" else None,
                                                          find_unused_parameters=not task_cls.static_graph)

    train_loader = make_loader(data.train, args, True, data.train_collate)
    val_loader = make_loader(data.val, args, False, data.val_collate)
    if len(train_loader) == 0:
        raise UserError(f"{len(data.train)} training samples are fewer than one batch of {args.batch_size} per device; "
                        f"lower --batch_size")
    eff_batch = args.batch_size * args.accum_iter * world
    lr = args.lr or args.blr * eff_batch / 256
    warmup = args.warmup_steps / len(train_loader) if args.warmup_steps is not None else args.warmup_epochs
    optimizer = torch.optim.AdamW(param_groups(task, args.weight_decay), lr=lr, betas=tuple(args.opt_betas))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    start_epoch = load_run_state(weights, task, optimizer, scaler, weights_ckpt) if continue_run else 0
    weights_ckpt = None  # not held in memory for the whole run
    prepare = BatchPreparer(device, task_cls.batch_keys, tokenizer)
    regularizer = (lambda: self_regularization(backbone)) if args.self_regularization else None
    n_train = sum(trainable.values())
    if dist_util.is_main_process():
        print(f"{args.exp_name}: {args.model} ({describe(backbone.cfg)}), {n_train / 1e6:.2f}M trainable parameters: "
              + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sorted(trainable.items()))
              + (f"; LoRA rank {args.lora_rank} alpha {args.lora_alpha:g}" if args.lora_rank else "")
              + (f", self-regularization weight {args.reg_loss_weight:g}" if args.self_regularization else ""))
        sources = args.data_file_path or args.data_path
        print(f"data: {sources} ({len(data.train)} train / {len(data.val)} val)"
              + (f", visual tokenizer {args.d_vae_type} ({tokenizer.vocab_size} tokens)" if tokenizer is not None else "")
              + (f", text tokenizer {args.tokenizer} ({len(text_tokenizer)} tokens)" if text_tokenizer is not None else "")
              + f", {world} process(es), effective batch {eff_batch}, lr {lr:.3g}, amp {args.amp}, device {device}")
        save_args(args, output_dir, "eval_args.yaml" if args.eval else "args.yaml")  # an eval never rewrites a run's files

    if args.eval:
        seed_everything(args.seed + rank)  # held-out masks are the same in every evaluation
        stats = evaluate(model, val_loader, device, prepare, amp_dtype)
        if dist_util.is_main_process():
            print("eval: " + json.dumps({k: round(v, 4) for k, v in stats.items()}))
            stats.update(report_stage(args, task, backbone, data, grid, carried, tokenizer, text_tokenizer, device,
                                      output_dir, "eval_report.json"))
        return stats

    log_writer = None
    if dist_util.is_main_process():
        from torch.utils.tensorboard import SummaryWriter

        log_writer = SummaryWriter(log_dir=args.log_dir)
    settings = StepSettings(lr=lr, min_lr=args.min_lr, warmup_epochs=warmup, epochs=args.epochs,
                            accum_iter=args.accum_iter, clip_grad=args.clip_grad, amp_dtype=amp_dtype,
                            print_freq=args.print_freq, max_bad_samples=args.max_bad_samples,
                            reg_loss_weight=args.reg_loss_weight)
    lora_meta = {"lora": {"rank": args.lora_rank, "alpha": args.lora_alpha}} if args.lora_rank else None
    skipped_total, stats = 0, {}
    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        # data order, augmentation, masks and compound draws are functions of (seed, rank, epoch):
        # a resumed run continues exactly where a straight run would be
        seed_everything(args.seed + rank + 1000 * epoch)
        task.set_epoch(epoch)
        if hasattr(train_loader.dataset, "set_epoch"):
            train_loader.dataset.set_epoch(epoch)
        elif isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        else:
            train_loader.sampler.generator.manual_seed(args.seed + epoch)
        train_stats = train_one_epoch(model, train_loader, optimizer, device, epoch, settings, prepare, scaler,
                                      log_writer, skipped_total, regularizer=regularizer)
        skipped_total += int(train_stats.get("skipped_samples", 0))
        seed_everything(args.seed + rank)  # held-out masks are the same in every evaluation
        test_stats = evaluate(model, val_loader, device, prepare, amp_dtype)
        stats = {**{f"train_{k}": v for k, v in train_stats.items()}, **{f"test_{k}": v for k, v in test_stats.items()},
                 "epoch": epoch, "n_parameters": n_train}
        last = epoch + 1 == args.epochs
        if dist_util.is_main_process():
            if (epoch + 1) % args.save_per_epochs == 0 or last:
                path = save_run_checkpoint(output_dir, epoch, (epoch + 1) * len(train_loader), task, optimizer, scaler,
                                           backbone.cfg.to_dict(), plain(vars(args)), lora_meta, carried)
                print(f"saved {path}")
            for key, value in test_stats.items():
                log_writer.add_scalar(f"test/{key}", value, epoch)
            with open(output_dir / "log.txt", "a") as f:
                f.write(json.dumps(stats) + "\n")
            print(f"epoch {epoch}: " + "  ".join(f"{k} {v:.4g}" for k, v in test_stats.items())
                  + (f"  (skipped {int(train_stats['skipped_samples'])} unreadable samples)"
                     if train_stats.get("skipped_samples") else ""), flush=True)
    if dist_util.is_main_process() and stats:
        if args.lora_rank:
            finish_lora_stage(args, task, backbone, output_dir, carried)
        summary = f"done in {time.time() - start:.0f}s"
        if tokenizer is not None and "test_acc_mim" in stats:
            baseline = majority_baseline(val_loader, prepare)
            summary += (f": held-out MIM accuracy {stats['test_acc_mim']:.3f} (always predicting the most frequent "
                        f"token: {baseline:.3f}; uniform chance: {1 / tokenizer.vocab_size:.4f})")
            stats["majority_baseline"] = baseline
        print(summary)
        stats["stage_report"] = report_stage(args, task, backbone, data, grid, carried, tokenizer, text_tokenizer,
                                             device, output_dir)
        log_writer.close()
    dist_util.cleanup()
    return stats


if __name__ == "__main__":
    main()
