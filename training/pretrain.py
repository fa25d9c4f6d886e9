"""`pretrain(cfg)`: one continual-pretraining stage (image MIM, text MLM, image-text contrastive or
their compound), from a frozen `PretrainConfig`. The entry script, the demo chain and the tests
call it."""
from __future__ import annotations

import json
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Subset

from common import distributed as dist_util
from common.config_args import flat_settings, save_settings
from common.console import say
from common.errors import UserError
from custom_datasets.mixing import MixedSources
from custom_datasets.pretrain_data import PretrainData, build_pretrain_data
from custom_datasets.sources import source_for
from training.engine_pretrain import evaluate, train_one_epoch
from models.backbone import VLMoBackbone
from models.lora import add_lora
from models.modes import ModeOptions, PretrainMode
from models.modes.image_mae import MAEShape
from models.pretrained import UNTRAINED, describe, weight_groups
from models.registry import find_variant
from models.run_info import compact, preprocessing, text_tokenizer_record
from models.trainability import configure_trainable
from training.batch import BatchPreparer
from training.compilation import compile_modules
from training.config import PretrainConfig
from training.continual import ContinualMethod
from training.continual.fisher import FISHER_FILE, write_fisher
from training.finite import check_evaluation
from training.fsdp import gathered_state, is_sharded, shard, unsharded_root
from training.optim import adamw, amp_dtype, grad_scaler, learning_rate
from training.pretrain_finish import finish_stage, report_stage
from training.run_checkpoint import (
    MID_EPOCH,
    latest_checkpoint,
    load_run_state,
    load_run_weights,
    prune_step_checkpoints,
    run_checkpoint_path,
    run_state,
    save_run_checkpoint,
)
from training.resume_changes import TOKENIZER_DIGEST, keep_previous_settings, resume_changes, tokenizer_digest
from training.scaffold import RunContext, checkpoint_due, last_step, run_eta
from training.sharded_checkpoint import save_sharded_run_checkpoint
from training.step import StepSettings, cause_of
from training.step_checkpoints import (
    StepCheckpointer,
    check_mid_epoch_resume,
    check_step_interval,
    note_world_change,
    resumed_progress,
)
from training.tokenizers import build_text_tokenizer, build_visual_tokenizer
from training.weights import CarriedHeads, Weights, attach_heads, build_backbone, resolve_weights


@dataclass
class PretrainRun:
    """Everything a stage is built from, made once by `build_run`."""

    cfg: PretrainConfig
    ctx: RunContext
    mode: PretrainMode
    model: torch.nn.Module  # the mode, DDP-wrapped when there are several processes
    data: PretrainData
    grid: tuple[int, int]
    text_tokenizer: Any
    visual_tokenizer: Any
    carried: CarriedHeads
    weights: Weights
    trainable: dict[str, int]
    untrained: list[str]  # weight groups no run has trained yet, after this one (recorded in checkpoints)
    method: ContinualMethod
    resume_changes: list[str] = field(default_factory=list)  # settings a resume changed ('name old -> new')
    fisher_file: str | None = None  # the Fisher sidecar this stage wrote (named in its handover files)

    @property
    def backbone(self) -> VLMoBackbone:
        return self.mode.backbone

    def starting_backbone(self) -> VLMoBackbone:
        """The backbone as this stage's first start built it from --init_from (a resumed run's own
        weights have moved since)."""
        from training.config import replace
        from training.weights import read_weights

        cfg = replace(self.cfg, model={"resume": None})
        vocab = len(self.text_tokenizer) if self.text_tokenizer is not None else None
        return build_backbone(cfg, Weights(cfg.model.init_from, read_weights(cfg.model.init_from)), vocab)

    def stage_config(self, folder: Path) -> PretrainConfig:
        """The settings an earlier stage ran with (its args.yaml), e.g. to replay its data."""
        from training.cli import pretrain_config_from_argv

        return pretrain_config_from_argv(["--config", str(folder / "args.yaml"), "--output_dir", str(folder)],
                                         recorded=True)

    def mode_options(self, visual_tokenizer) -> ModeOptions:
        return mode_options(self.cfg, visual_tokenizer)

    def info(self) -> dict[str, Any]:
        """The self-description every checkpoint of this stage carries."""
        cfg = self.cfg
        text = (text_tokenizer_record(self.text_tokenizer, cfg.text.tokenizer) if self.text_tokenizer is not None
                else None)
        return compact(task=cfg.exp_name, heads={**self.carried.specs, **self.mode.head_specs()},
                       preprocessing=preprocessing(cfg.model.image_size, 1.0, cfg.views.imagenet_default_mean_and_std),
                       text_tokenizer=text, max_text_len=cfg.text.max_text_len if text else None,
                       untrained=self.untrained,
                       continual=compact(method=cfg.continual.cl_method, fisher=self.fisher_file, **self.method.knobs()))


def resolve_resume(cfg: PretrainConfig, ctx: RunContext) -> PretrainConfig:
    """`--auto_resume` picks the newest checkpoint."""
    from training.config import replace

    if cfg.model.auto_resume and not cfg.model.resume:
        found = latest_checkpoint(ctx.output_dir)
        cfg = replace(cfg, model={"resume": str(found) if found else None})
    return cfg


FINISHED_STAGE = ("stage_report.json", "adapters.safetensors", "merged_model.safetensors")


def refuse_taken_output(cfg: PretrainConfig, ctx: RunContext) -> None:
    """A folder holding a run, or what a finished stage left there (its report and handover files,
    even with its checkpoints deleted), is never overwritten or appended to; `--auto_resume` starts
    afresh in a folder whose run left only a log (it stopped before its first checkpoint). Checked
    after the data is (a wrong --data_path is reported as such, even into a taken folder) and before
    anything is written there."""
    if cfg.model.resume or cfg.run.eval:
        return
    if latest_checkpoint(ctx.output_dir) is not None:
        raise UserError(f"--output_dir {ctx.output_dir} already holds checkpoints of a run; pass --auto_resume to "
                        f"continue it or choose another --output_dir (nothing is overwritten)")
    left = [name for name in FINISHED_STAGE if (ctx.output_dir / name).exists()]
    if left:
        raise UserError(f"--output_dir {ctx.output_dir} already holds {', '.join(left)} of a finished stage; choose "
                        f"another --output_dir for this one (nothing is overwritten)")
    if (ctx.output_dir / "log.txt").exists() and not cfg.model.auto_resume:
        raise UserError(f"--output_dir {ctx.output_dir} holds the log.txt of a run that stopped before its first "
                        f"checkpoint; pass --auto_resume to start it again there, or choose another --output_dir")


def limit_samples(data: PretrainData, cfg: PretrainConfig) -> None:
    if cfg.data.max_train_samples and isinstance(data.train, MixedSources):  # the epoch, not the first source
        data.train.epoch_size = min(cfg.data.max_train_samples, data.train.epoch_size)
    elif cfg.data.max_train_samples and not isinstance(data.train, IterableDataset):
        data.train = Subset(data.train, range(min(cfg.data.max_train_samples, len(data.train))))
    if cfg.data.max_val_samples and not isinstance(data.val, IterableDataset):
        data.val = Subset(data.val, range(min(cfg.data.max_val_samples, len(data.val))))


def build_run(cfg: PretrainConfig, ctx: RunContext) -> PretrainRun:
    mode_cls = cfg.mode
    cfg = resolve_resume(cfg, ctx)
    weights, cfg = resolve_weights(cfg)
    text_tokenizer, cfg = build_text_tokenizer(cfg)
    backbone = build_backbone(cfg, weights, len(text_tokenizer) if text_tokenizer is not None else None)
    cfg = settle_image_sizes(cfg, backbone.cfg.img_size)
    if cfg.text.max_text_len > backbone.cfg.max_text_len:
        raise UserError(f"--max_text_len {cfg.text.max_text_len} exceeds the model's {backbone.cfg.max_text_len} "
                        f"text positions")
    grid = backbone.cfg.grid_size
    data = build_pretrain_data(cfg.data_config, mode_cls.data_kind, grid, text_tokenizer, mode_cls.needs_mlm_masks)
    limit_samples(data, cfg)
    refuse_taken_output(cfg, ctx)
    visual_tokenizer = None
    if mode_cls.needs_visual_tokens:
        extra = weights.ckpt.extra if weights.ckpt is not None else {}
        carried = {part: extra[f"dall_e_{part}"] for part in ("encoder", "decoder") if extra.get(f"dall_e_{part}")}
        visual_tokenizer, cfg = build_visual_tokenizer(cfg, data.train, grid[0], ctx.device, carried)
    changes = (resume_changes(weights.path, weights.ckpt.extra.get("args") or {}, flat_settings(cfg),
                              weights.ckpt.extra.get(TOKENIZER_DIGEST), tokenizer_digest(visual_tokenizer))
               if weights.continue_run and not weights.ckpt.extra.get("foreign_run") else [])
    mode = mode_cls(backbone, mode_options(cfg, visual_tokenizer))
    carried = attach_heads(mode, weights.ckpt)
    if cfg.lora.lora_rank:
        add_lora(backbone, cfg.lora.lora_rank, cfg.lora.lora_alpha, cfg.lora.lora_dropout)
    trainable = configure_trainable(mode, bool(cfg.lora.lora_rank), list(cfg.lora.trainable_extra),
                                    cfg.lora.lora_trainable or "both")
    untrained = still_untrained(mode, weights)
    if cfg.model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    mode.to(ctx.device)
    for head in carried.modules.values():
        head.to(ctx.device)
    if cfg.model.fsdp:
        if weights.continue_run:  # sharded parameters load no plain state: the run's weights go in first
            load_run_weights(weights.path, mode, weights.ckpt)
        shard(mode, backbone.blocks)
        model = mode
    else:
        model = ctx.wrap(mode, find_unused_parameters=not mode_cls.static_graph)
    if cfg.model.compile:  # after sharding: each compiled block keeps its FSDP hooks outside the graph
        compile_modules(backbone.blocks, visual_tokenizer)
    run = PretrainRun(cfg, ctx, mode, model, data, grid, text_tokenizer, visual_tokenizer, carried, weights, trainable,
                      untrained, cfg.method(cfg), changes)
    if not cfg.run.eval:
        run.method.start(run)  # before the starting checkpoint is let go (build_optimization)
    return run


def settle_image_sizes(cfg: PretrainConfig, built: int) -> PretrainConfig:
    """--image_size as built (the flag, else the checkpoint's, else 224: a text stage started from a
    64 px stage stays at 64 px) and the tokenizer view unless given: half of it (BEiT's DALL-E view),
    all of it for VQ-KD (BEiT v2's recipe: a 16 px patch tokenizer over the backbone's grid)."""
    from training.config import replace

    second = cfg.visual_tokenizer.second_image_size or (built if cfg.visual_tokenizer.d_vae_type == "vqkd"
                                                        else built // 2)
    return replace(cfg, model={"image_size": built}, visual_tokenizer={"second_image_size": second})


def still_untrained(mode: PretrainMode, weights: Weights) -> list[str]:
    """Weight groups that neither the starting checkpoint's runs nor this one train (a model from
    scratch starts with all of them untrained)."""
    names = [n for n, _ in mode.backbone.named_parameters(prefix="backbone")]
    before = set(weights.ckpt.info.get(UNTRAINED, [])) if weights.ckpt is not None else weight_groups(names)
    trained = weight_groups(n for n, p in mode.named_parameters() if p.requires_grad)
    return sorted(before - trained)


def mae_shape(cfg: PretrainConfig) -> MAEShape:
    m = cfg.mae
    return MAEShape(m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads, cfg.views.mask_ratio, m.norm_pix_loss)


def mode_options(cfg: PretrainConfig, visual_tokenizer) -> ModeOptions:
    obj = cfg.objectives
    return ModeOptions(visual_vocab_size=visual_tokenizer.vocab_size if visual_tokenizer is not None else None,
                       gather=dist_util.gather_with_grad if obj.aggregate_itc else (lambda x: x),
                       mim_conduct_prob=obj.mim_conduct_prob, mlm_conduct_prob=obj.mlm_conduct_prob,
                       itc_conduct_prob=obj.itc_conduct_prob, itm_conduct_prob=obj.itm_conduct_prob,
                       fused_mlm=obj.fused_mlm, seed=cfg.run.seed, mae=mae_shape(cfg),
                       patch_aggregation=None if obj.early_layers is None else
                       (obj.early_layers, obj.head_layers, obj.shared_lm_head))


@dataclass
class Optimization:
    train_loader: DataLoader
    val_loader: DataLoader
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    settings: StepSettings
    prepare: BatchPreparer
    start_epoch: int
    eff_batch: int
    mid_epoch: dict[str, Any] | None = None  # where a step checkpoint left the epoch it resumes (step_checkpoints.py)


def build_optimization(run: PretrainRun) -> Optimization:
    cfg, ctx, opt = run.cfg, run.ctx, run.cfg.optim
    pin = cfg.data.pin_mem
    train_loader = ctx.loader(run.data.train, opt.batch_size, cfg.data.num_workers, True, run.data.train_collate,
                              pin_memory=pin, persistent_workers=not cfg.run.save_every_steps)
    val_loader = ctx.loader(run.data.val, opt.batch_size, cfg.data.num_workers, False, run.data.val_collate,
                            pin_memory=pin)
    if len(train_loader) == 0:
        raise UserError(f"{len(run.data.train)} training samples are fewer than one batch of {opt.batch_size} per "
                        f"device; lower --batch_size")
    eff_batch = opt.batch_size * opt.accum_iter * ctx.world
    lr = learning_rate(opt.lr, opt.blr, eff_batch)
    warmup = opt.warmup_steps / len(train_loader) if opt.warmup_steps is not None else opt.warmup_epochs
    optimizer = adamw(run.mode, lr, opt.weight_decay, tuple(opt.opt_betas), opt.adamw_impl)
    scaler = grad_scaler(cfg.run.amp, ctx.device)
    start_epoch, mid_epoch = cfg.run.start_epoch, None
    if run.weights.continue_run:
        mid_epoch = run.weights.ckpt.extra.get(MID_EPOCH)
        if mid_epoch:
            check_mid_epoch_resume(run.weights.path, mid_epoch, run.weights.ckpt.extra.get("args") or {},
                                   flat_settings(cfg), len(train_loader))
        start_epoch = load_run_state(run.weights.path, run.mode, optimizer, scaler, run.weights.ckpt)
        note_world_change(run.weights.path, run.weights.ckpt.extra.get("world_size"), ctx.world, mid_epoch)
    if cfg.run.save_every_steps and not cfg.run.eval:
        check_step_interval(cfg.run.save_every_steps, len(train_loader), opt.accum_iter)
    run.weights.ckpt = None  # not held in memory for the whole run
    settings = StepSettings(lr=lr, min_lr=opt.min_lr, warmup_epochs=warmup, epochs=opt.epochs,
                            accum_iter=opt.accum_iter, clip_grad=opt.clip_grad, amp_dtype=amp_dtype(cfg.run.amp),
                            print_freq=cfg.run.print_freq, max_bad_samples=cfg.data.max_bad_samples,
                            reg_loss_weight=cfg.lora.reg_loss_weight, batch_reg_weight=run.method.batch_penalty_weight(),
                            data_name=data_description(cfg))
    prepare = BatchPreparer(ctx.device, cfg.mode.batch_keys, run.visual_tokenizer)
    return Optimization(train_loader, val_loader, optimizer, scaler, settings, prepare, start_epoch, eff_batch,
                        mid_epoch)


def data_description(cfg: PretrainConfig) -> str:
    """What the run trains on, in words, as its reader says it: never a surprise (the synthetic world
    only when asked for)."""
    kind = {"image": "images", "text": "captions", "pair": "image-text pairs"}[cfg.mode.data_kind]
    return source_for(cfg.data_config, cfg.mode.data_kind).describe(cfg.data_config, kind)


def describe_run(run: PretrainRun, optim: Optimization) -> None:
    cfg, ctx = run.cfg, run.ctx
    if not ctx.is_main:
        return
    n_train = sum(run.trainable.values())
    factors = "" if (cfg.lora.lora_trainable or "both") == "both" else f", only the {cfg.lora.lora_trainable} factors train"
    variant = cfg.model.model or find_variant(run.backbone.cfg) or "custom"
    say(f"{cfg.exp_name}: {variant} ({describe(run.backbone.cfg)}), {n_train / 1e6:.2f}M trainable parameters: "
          + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sorted(run.trainable.items()))
          + (f"; LoRA rank {cfg.lora.lora_rank} alpha {cfg.lora.lora_alpha:g}{factors}" if cfg.lora.lora_rank else "")
          + (f", self-regularization weight {cfg.lora.reg_loss_weight:g}" if cfg.lora.self_regularization else "")
          + run.method.note())
    vt, tt = run.visual_tokenizer, run.text_tokenizer
    say(f"data: {data_description(cfg)} ({len(run.data.train)} train / {len(run.data.val)} val samples)"
          + (f", visual tokenizer {cfg.visual_tokenizer.d_vae_type} ({vt.vocab_size} tokens)" if vt is not None else "")
          + (f", text tokenizer {cfg.text.tokenizer} ({len(tt)} tokens)" if tt is not None else "")
          + f", {dist_util.placement()}, effective batch {optim.eff_batch}, lr {optim.settings.lr:.3g}, "
            f"amp {cfg.run.amp}, device {ctx.device}")
    if run.resume_changes:
        say(f"resuming with changed settings: {'; '.join(run.resume_changes)}")
        if not cfg.run.eval:
            mid = optim.mid_epoch
            trained = f"{mid['epoch']}-step{mid['batches_done']}" if mid else str(optim.start_epoch - 1)
            kept = keep_previous_settings(ctx.output_dir, "args.yaml", trained)
            if kept is not None:
                until = (f"epoch {mid['epoch']}'s first {mid['batches_done']} batches" if mid
                         else f"epochs up to {optim.start_epoch - 1}")
                say(f"the settings of {until} are kept in {kept}")
    save_settings(cfg, ctx.output_dir, "eval_args.yaml" if cfg.run.eval else "args.yaml")  # an eval never rewrites a run's files


def evaluate_checkpoint(run: PretrainRun, optim: Optimization) -> dict[str, float]:
    run.ctx.reseed_for_evaluation()
    stats = evaluate(run.model, optim.val_loader, run.ctx.device, optim.prepare, optim.settings.amp_dtype)
    say("eval: " + json.dumps({k: round(v, 4) for k, v in stats.items()}))
    if run.ctx.is_main or is_sharded(run.mode):  # a sharded model needs every rank for each forward
        with unsharded_root(run.mode):
            stats.update(report_stage(run, "eval_report.json", pictures=False))
    return stats


def write_checkpoint(run: PretrainRun, optim: Optimization, epoch: int, step: int, name: str | None,
                     record: dict[str, Any]) -> None:
    """A run checkpoint after `epoch` (named by it, or by `name` within the next one): every rank
    writes its shards of a sharded checkpoint; a sharded model is gathered by every rank; rank 0 writes."""
    cfg, ctx = run.cfg, run.ctx
    if cfg.model.sharded_checkpoint:
        state = run_state(epoch, step, optim.scaler, run.backbone.cfg.to_dict(), flat_settings(cfg), record, run.info())
        path = save_sharded_run_checkpoint(run_checkpoint_path(ctx.output_dir, epoch, name), run.mode,
                                           optim.optimizer, state, run.carried.tensors)
        say(f"saved {path} (sharded)")
        return
    gathered = gathered_state(run.mode, optim.optimizer) if is_sharded(run.mode) else None  # every rank
    if ctx.is_main:
        path = save_run_checkpoint(ctx.output_dir, epoch, step, run.mode, optim.optimizer, optim.scaler,
                                   run.backbone.cfg.to_dict(), flat_settings(cfg), record, run.carried.tensors,
                                   name=name, info=run.info(), gathered=gathered)
        say(f"saved {path}")


def train_epochs(run: PretrainRun, optim: Optimization, log_writer) -> tuple[dict[str, Any], float]:
    """(the last epoch's statistics, seconds spent in the epochs)."""
    cfg, ctx = run.cfg, run.ctx
    method = run.method
    record = {"lora": {"rank": cfg.lora.lora_rank, "alpha": cfg.lora.lora_alpha}} if cfg.lora.lora_rank else {}
    record[TOKENIZER_DIGEST] = tokenizer_digest(run.visual_tokenizer)  # what a resume checks its targets by
    record["world_size"] = ctx.world  # a resume with another number of processes says what changes
    skipped_total, stats, start = 0, {}, time.time()

    def save_within_epoch(epoch: int, step: int, name: str, extra: dict[str, Any]) -> None:
        write_checkpoint(run, optim, epoch, step, name, {**record, **extra})

    steps = StepCheckpointer(run, optim, save_within_epoch) if cfg.run.save_every_steps else None
    for epoch in range(optim.start_epoch, cfg.optim.epochs):
        ctx.start_epoch(optim.train_loader, epoch)
        run.mode.set_epoch(epoch)
        resumed = None
        if epoch == optim.start_epoch:
            resumed, skipped_total = resumed_progress(run, optim.mid_epoch)
        if steps is not None:
            steps.start_epoch(epoch, skipped_total)
        train_stats = train_one_epoch(run.model, optim.train_loader, optim.optimizer, ctx.device, epoch, optim.settings,
                                      optim.prepare, optim.scaler, log_writer, skipped_total,
                                      regularizer=method.penalty if method.has_penalty else None,
                                      batch_regularizer=method.batch_penalty if method.has_penalty else None,
                                      at_step_end=steps, resumed=resumed)
        skipped_total += int(train_stats.get("skipped_samples", 0))
        ctx.reseed_for_evaluation()
        test_stats = evaluate(run.model, optim.val_loader, ctx.device, optim.prepare, optim.settings.amp_dtype)
        check_evaluation(test_stats, epoch, cause_of(optim.settings))
        stats = {**{f"train_{k}": v for k, v in train_stats.items()}, **{f"test_{k}": v for k, v in test_stats.items()},
                 "epoch": epoch, "n_parameters": sum(run.trainable.values())}
        if checkpoint_due(epoch, cfg.optim.epochs, cfg.run.save_per_epochs, cfg.run.save_epochs_from_zero):
            write_checkpoint(run, optim, epoch, (epoch + 1) * len(optim.train_loader), None, record)
            if cfg.run.save_every_steps and ctx.is_main:  # the step checkpoints before it are superseded
                prune_step_checkpoints(ctx.output_dir, cfg.run.keep_last_checkpoints)
        if ctx.is_main:
            for key, value in test_stats.items():
                log_writer.add_scalar(f"test/{key}", value, last_step(epoch + 1))
            ctx.append_log(stats)
            say(f"epoch {epoch}: " + "  ".join(f"{k} {v:.4g}" for k, v in test_stats.items())
                  # held-out losses have no penalty: the training one is what the method adds
                  + (f"  train loss_reg {train_stats['loss_reg']:.4g}" if "loss_reg" in train_stats else "")
                  + (f"  (skipped {int(train_stats['skipped_samples'])} unreadable samples)"
                     if train_stats.get("skipped_samples") else "")
                  + f"  {run_eta(start, epoch + 1 - optim.start_epoch, cfg.optim.epochs - epoch - 1)}")
    return stats, time.time() - start


def end_of_stage(run: PretrainRun, optim: Optimization, stats: dict[str, Any]) -> None:
    """On every rank, before the handover files: the method's last word (e.g. wise interpolation),
    then the Fisher information of the final weights when asked for (its objective may gather)."""
    run.method.finish(run)
    if run.cfg.continual.fisher_samples:
        stats["fisher_batches"] = write_fisher(run, optim)
        run.fisher_file = FISHER_FILE


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Build the stage, then evaluate (`--eval`) or train it; returns the last epoch's statistics
    (with the stage report). A training run holds its output folder until it ends."""
    ctx = RunContext.start(cfg.run.device, cfg.run.output_dir, cfg.run.seed, exclusive=not cfg.run.eval)
    try:
        run = build_run(cfg, ctx)
        optim = build_optimization(run)
        describe_run(run, optim)
        if run.cfg.run.eval:
            return evaluate_checkpoint(run, optim)
        if run.weights.continue_run or run.cfg.model.auto_resume:  # epochs logged after the checkpoint are redone
            ctx.truncate_log(optim.start_epoch - 1)
        done = optim.mid_epoch["batches_done"] / len(optim.train_loader) if optim.mid_epoch else 0.0
        log_writer = ctx.tensorboard(run.cfg.run.log_dir, optim.start_epoch, done)
        try:
            stats, seconds = train_epochs(run, optim, log_writer)
            if stats:
                end_of_stage(run, optim, stats)
            if stats and (ctx.is_main or is_sharded(run.mode)):  # sharded: every rank takes part, rank 0 writes
                gathered = gathered_state(run.mode)[0] if is_sharded(run.mode) and run.cfg.lora.lora_rank else None
                with unsharded_root(run.mode):
                    finish_stage(run, optim, stats, seconds, log_writer, gathered)
        finally:
            if log_writer is not None:
                log_writer.close()
        return stats
    finally:
        ctx.finish()
