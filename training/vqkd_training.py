"""Training a VQ-KD tokenizer (util/train_vqkd.py): the user's images (folders, `.npy` tiles, the
synthetic world) through a frozen teacher, the autoencoder of models/visual_tokenizers/vqkd_model.py,
AdamW with warmup and cosine decay, the codebook's k-means start, EMA updates and dead-code
restarts; DDP under torchrun; a resume file after every epoch; held-out codebook usage and
perplexity each epoch; the tokenizer written for `--d_vae_type vqkd`, with a picture of its token maps."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from common import distributed as dist_util
from common.checkpoint_io import load_torch_file, save_torch_atomic
from common.console import say
from common.errors import UserError
from common.lr_sched import lr_at, set_lr
from common.metrics import ProgressPrinter
from custom_datasets.batch import NUM_SKIPPED, TOKENIZER_IMAGE
from custom_datasets.collate import collate_skipping_bad
from custom_datasets.pretrain_data import build_image_datasets
from custom_datasets.settings import DataSettings, PretrainDataConfig, TextSettings, ViewSettings
from models.visual_tokenizers.vqkd import save_vqkd_tokenizer
from models.visual_tokenizers.vqkd_codebook import ema_update_, kmeans_init_, restart_dead_codes_, usage_and_perplexity
from models.visual_tokenizers.vqkd_model import VqkdAutoencoder, VqkdShape
from models.visual_tokenizers.vqkd_vit import VQKD_VARIANTS, VitShape
from training.vqkd_teacher import Teacher


@dataclass(frozen=True)
class VqkdSettings:
    data_path: str
    teacher: str
    output: str
    model: str = "vqkd_tiny"
    image_size: int = 64
    patch_size: int = 8
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4
    codebook_size: int = 512
    codebook_dim: int = 32
    decoder_depth: int = 1
    decay: float = 0.99
    restart_below: float = 0.03  # a code used less than this share of its fair count is restarted
    teacher_layer: int | None = None
    bands: str | None = None
    val_fraction: float = 0.05
    synthetic_train_size: int = 2000
    seed: int = 0
    num_workers: int = 2
    device: str = "cpu"
    resume: bool = False

    @property
    def resume_file(self) -> Path:
        return Path(f"{self.output}.resume.pth")


@dataclass
class VqkdRun:
    cfg: VqkdSettings
    model: VqkdAutoencoder
    wrapped: torch.nn.Module  # DDP around `model` under torchrun
    teacher: Teacher
    optimizer: torch.optim.Optimizer
    train: DataLoader
    val: DataLoader
    device: torch.device
    gen: torch.Generator
    start_epoch: int = 0


def build_loaders(cfg: VqkdSettings, grid: int, world: int, rank: int) -> tuple[DataLoader, DataLoader]:
    data = DataSettings(data_path=cfg.data_path, val_fraction=cfg.val_fraction, bands=cfg.bands,
                        synthetic_train_size=cfg.synthetic_train_size, synthetic_val_size=max(64, cfg.batch_size))
    views = ViewSettings(mask_strategy="random", mim_probability=0.5)
    train_set, val_set = build_image_datasets(PretrainDataConfig(data, TextSettings(), views, cfg.image_size,
                                                                 cfg.image_size, cfg.seed), (grid, grid))
    if len(train_set) < cfg.batch_size * world:
        raise UserError(f"--data_path {cfg.data_path}: {len(train_set)} training images, fewer than one batch of "
                        f"{cfg.batch_size} x {world} process(es); lower --batch_size")
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True) \
        if world > 1 else None
    train = DataLoader(train_set, cfg.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
                       num_workers=cfg.num_workers, collate_fn=collate_skipping_bad,
                       generator=torch.Generator().manual_seed(cfg.seed))
    val_sampler = DistributedSampler(val_set, world, rank, shuffle=False) if world > 1 else None
    val = DataLoader(val_set, cfg.batch_size, sampler=val_sampler, num_workers=cfg.num_workers,
                     collate_fn=collate_skipping_bad)
    return train, val


def build_vqkd_run(cfg: VqkdSettings) -> VqkdRun:
    if cfg.model not in VQKD_VARIANTS:
        raise UserError(f"--model {cfg.model} is not a VQ-KD encoder; choose one of {', '.join(VQKD_VARIANTS)}")
    if cfg.image_size % cfg.patch_size:
        raise UserError(f"--image_size {cfg.image_size} is not a multiple of --patch_size {cfg.patch_size}")
    rank, world, local = dist_util.init_distributed(cfg.device)
    device = torch.device(f"cuda:{local}" if cfg.device.startswith("cuda") and world > 1 else cfg.device)
    torch.manual_seed(cfg.seed)
    grid = cfg.image_size // cfg.patch_size
    teacher = Teacher(cfg.teacher, grid, cfg.teacher_layer).to(device)
    width, depth = VQKD_VARIANTS[cfg.model]
    encoder = VitShape(cfg.image_size, cfg.patch_size, 3, width, depth, max(1, width // 64))
    shape = VqkdShape(encoder, cfg.codebook_size, cfg.codebook_dim, cfg.decoder_depth, teacher.dim)
    model = VqkdAutoencoder(shape).to(device)
    dist_util.broadcast_from_main([*model.parameters(), *model.buffers()])
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train, val = build_loaders(cfg, grid, world, rank)
    run = VqkdRun(cfg, model, wrapped, teacher, optimizer, train, val, device, torch.Generator().manual_seed(cfg.seed))
    if cfg.resume:
        resume_from(run)
    return run


def resume_from(run: VqkdRun) -> None:
    path = run.cfg.resume_file
    if not path.is_file():
        raise UserError(f"--resume: no {path} to continue from (a run writes it after every epoch)")
    saved = load_torch_file(path)
    if saved["settings"]["teacher"] != run.cfg.teacher or saved["settings"]["model"] != run.cfg.model:
        raise UserError(f"--resume: {path} was trained with another --teacher or --model; start a new --output")
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.gen.set_state(saved["generator"])
    run.start_epoch = saved["epoch"] + 1
    say(f"resuming from {path} at epoch {run.start_epoch}")


def train_step(run: VqkdRun, images: torch.Tensor, epoch_float: float) -> dict[str, float]:
    cfg, quantizer = run.cfg, run.model.tokenizer.quantize
    if not quantizer.embedding.initted.item():  # the first step only: the encoder's vectors start the codes
        with torch.no_grad():
            kmeans_init_(quantizer, run.model.encode(images)[0].flatten(0, 1), run.gen)
        say(f"codebook: {cfg.codebook_size} codes from k-means of the first batch's vectors")
    set_lr(run.optimizer, lr_at(epoch_float, cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs))
    out = run.wrapped(images, run.teacher(images))
    run.optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 3.0)
    run.optimizer.step()
    z, ids = out["z"].flatten(0, 1), out["ids"].flatten()
    ema_update_(quantizer, z, ids, cfg.decay)
    fair = ids.numel() * dist_util.world_size() / cfg.codebook_size
    restarted = restart_dead_codes_(quantizer, z, cfg.restart_below * fair, run.gen)
    return {"loss": float(out["loss"].detach()), "rec_loss": float(out["rec_loss"]), "restarted": restarted}


def train_epoch(run: VqkdRun, epoch: int) -> dict[str, float]:
    run.model.train()
    if isinstance(run.train.sampler, DistributedSampler):
        run.train.sampler.set_epoch(epoch)
    total, sums, skipped = len(run.train), {"loss": 0.0, "rec_loss": 0.0, "restarted": 0.0}, 0
    progress = ProgressPrinter(f"Epoch [{epoch}]", total, max(1, total // 5))
    for step, batch in enumerate(run.train):
        skipped += int(batch.pop(NUM_SKIPPED, 0))
        if TOKENIZER_IMAGE not in batch:  # every image of the batch was unreadable
            continue
        images = batch[TOKENIZER_IMAGE].to(run.device)
        scalars = train_step(run, images, epoch + step / total)
        for key in sums:
            sums[key] += scalars[key]
        progress.step(step, len(images), {k: v for k, v in scalars.items() if k != "restarted"})
    return {"train_loss": sums["loss"] / total, "train_rec_loss": sums["rec_loss"] / total,
            "restarted_codes": sums["restarted"], "skipped_images": skipped}


@torch.no_grad()
def evaluate(run: VqkdRun) -> dict[str, float]:
    """Held-out cosine reconstruction loss, codebook usage (share of codes used) and perplexity."""
    run.model.eval()
    counts = torch.zeros(run.cfg.codebook_size, device=run.device)
    loss, batches = torch.zeros((), device=run.device), torch.zeros((), device=run.device)
    for batch in run.val:
        if TOKENIZER_IMAGE not in batch:
            continue
        images = batch[TOKENIZER_IMAGE].to(run.device)
        out = run.model(images, run.teacher(images))
        counts += torch.bincount(out["ids"].flatten(), minlength=run.cfg.codebook_size).float()
        loss, batches = loss + out["rec_loss"], batches + 1
    counts, loss, batches = (dist_util.all_reduce_sum(t) for t in (counts, loss, batches))
    usage, perplexity = usage_and_perplexity(counts)
    return {"val_rec_loss": float(loss / batches.clamp_min(1)), "val_usage": usage, "val_perplexity": perplexity}


def train_vqkd(cfg: VqkdSettings) -> dict[str, float]:
    """Train, write the tokenizer (and its picture); returns the last epoch's statistics."""
    run = build_vqkd_run(cfg)
    say(f"VQ-KD: {cfg.model} encoder at {cfg.image_size}px / patch {cfg.patch_size}, {cfg.codebook_size} x "
        f"{cfg.codebook_dim} codebook, {cfg.decoder_depth}-block decoder; teacher {cfg.teacher} (block "
        f"{run.teacher.layer}, {run.teacher.dim}-d); {len(run.train.dataset)} training images, "
        f"{dist_util.world_size()} process(es)")
    start, stats = time.time(), {}
    for epoch in range(run.start_epoch, cfg.epochs):
        stats = {**train_epoch(run, epoch), **evaluate(run)}
        done = epoch + 1 - run.start_epoch
        eta = (time.time() - start) / done * (cfg.epochs - epoch - 1)
        say(f"epoch {epoch}: " + "  ".join(f"{k} {v:.4g}" for k, v in stats.items()) + f"  run eta {eta:.0f}s")
        if dist_util.is_main_process():
            save_torch_atomic({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                               "generator": run.gen.get_state(), "epoch": epoch, "settings": asdict(cfg)},
                              cfg.resume_file)
    if dist_util.is_main_process():
        write_tokenizer(run, stats)
    dist_util.barrier()
    return stats


def write_tokenizer(run: VqkdRun, stats: dict[str, float]) -> None:
    from visualization.canvas import save_picture
    from visualization.token_maps import token_map_picture

    cfg = run.cfg
    info = {**run.teacher.describe(), "image_size": cfg.image_size, "codebook_size": cfg.codebook_size,
            "codebook_dim": cfg.codebook_dim, "decoder_depth": cfg.decoder_depth, "epochs": cfg.epochs,
            "data_path": cfg.data_path, **{k: round(v, 4) for k, v in stats.items() if k.startswith("val_")}}
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    save_vqkd_tokenizer(run.model.tokenizer, cfg.output, info)
    images = next((b[TOKENIZER_IMAGE] for b in run.val if TOKENIZER_IMAGE in b), None)
    if images is not None:
        images = images[:6].to(run.device)
        picture = token_map_picture(images.cpu(), run.model.tokenizer.get_codebook_indices(images).cpu(),
                                    cfg.codebook_size)
        save_picture(picture, Path(cfg.output).with_suffix(".tokens.png"))
    say(f"wrote {cfg.output} (use --d_vae_type vqkd --d_vae_weight_path {cfg.output} --second_image_size "
        f"{cfg.image_size}); held-out usage {stats.get('val_usage', 0):.3f}, perplexity "
        f"{stats.get('val_perplexity', 0):.1f}")
