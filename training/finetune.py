"""`finetune(cfg)`: one downstream run (any task of the registry) from a frozen `FinetuneConfig`.
The entry script, the transfer experiment and the tests call it."""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common import distributed as dist_util
from common.checkpoint_io import Checkpoint, atomic_write
from common.config_args import flat_settings, save_settings
from common.confusion_matrix import PER_CLASS_IOU
from common.console import say
from common.errors import UserError
from custom_datasets import batch as B
from custom_datasets.classification_data import whole_image_preprocessing
from custom_datasets.downstream_data import DownstreamData, build_downstream_data
from training.engine_finetune import evaluate, train_one_epoch
from models.checkpoints import read_model_checkpoint
from models.downstream import DownstreamTask
from models.pretrained import describe
from models.run_info import compact, preprocessing, text_tokenizer_record
from training.batch import BatchPreparer
from training.compilation import compile_modules
from training.config import FinetuneConfig
from training.finetune_model import build_task, text_tokenizer_for
from training.finite import check_evaluation
from training.fsdp import gathered_state, is_sharded, shard, share_main_buffers, unsharded_root
from training.optim import adamw_options, amp_dtype, grad_scaler, learning_rate
from training.run_checkpoint import save_run_checkpoint
from training.scaffold import RunContext, last_step, refuse_taken_output, run_eta
from training.step import StepSettings, cause_of

TASK_INPUTS = (B.IMAGE, B.IMAGE_2, B.INPUT_IDS, B.ATTENTION_MASK, B.LABEL, B.SEG_MASK, B.VQA_TARGETS, B.VQA_SCORES,
               B.QUESTION_ID, B.ANSWER_TYPE)


@dataclass
class FinetuneRun:
    cfg: FinetuneConfig
    ctx: RunContext
    task: DownstreamTask
    data: DownstreamData
    report: list[str]
    text_tokenizer: Any

    @property
    def num_classes(self) -> int:
        if hasattr(self.task.model, "num_classes"):  # a segmenter, a fused-pair classifier
            return self.task.model.num_classes
        classifier = getattr(self.task.model, "classifier", None)
        return classifier.out_features if classifier is not None else 0

    def info(self) -> dict[str, Any]:
        """The self-description of this run's checkpoints."""
        cfg = self.cfg
        text = (text_tokenizer_record(self.text_tokenizer, cfg.data.tokenizer)
                if self.text_tokenizer is not None else None)
        heads = {n: getattr(self.task.model, n).spec() for n in self.task.heads
                 if hasattr(getattr(self.task.model, n), "spec")}
        return compact(task=cfg.task, heads=heads or None, use_cls=cfg.model.use_cls,
                       preprocessing=self.preprocessing(),
                       text_tokenizer=text, max_text_len=cfg.data.max_text_len if text else None,
                       class_names=self.data.class_names or None, segmentation_inference=self.segmentation_inference())

    def preprocessing(self) -> dict:
        """The held-out view the run evaluated with (predict and exports repeat it)."""
        cfg = self.cfg
        if self.data.whole_image:
            return whole_image_preprocessing(cfg.model.input_size, cfg.augment.imagenet_default_mean_and_std)
        return preprocessing(cfg.model.input_size, cfg.augment.crop_pct, cfg.augment.imagenet_default_mean_and_std)

    def segmentation_inference(self) -> dict | None:
        """How held-out images were predicted (predict and exports repeat it)."""
        if self.cfg.task_class.data_kind != "segmentation":
            return None
        seg = self.cfg.segmentation
        return {"mode": seg.seg_inference, "stride": seg.seg_stride or max(1, self.cfg.model.input_size * 2 // 3)}


def freeze_unused(task: DownstreamTask) -> None:
    """Paths the task never takes get no gradient (DDP needs every trainable parameter used)."""
    unused = set(task.frozen_parameter_names())
    for name, param in task.model.named_parameters():
        if name in unused:
            param.requires_grad_(False)


def build_run(cfg: FinetuneConfig, ctx: RunContext, ckpt: Checkpoint | None) -> FinetuneRun:
    task_cls = cfg.task_class
    text_tokenizer = text_tokenizer_for(cfg, ckpt)
    recorded_names = ckpt.info.get("class_names") if ckpt is not None and ckpt.info.get("task") == cfg.task else None
    data = build_downstream_data(task_cls.data_kind, cfg.data, cfg.augment, cfg.model.input_size, text_tokenizer,
                                 cfg.segmentation_data, cfg.model.nb_classes, cfg.run.eval, recorded_names)
    refuse_taken_output(cfg.run.output_dir, cfg.run.eval)
    num_classes = len(data.class_names)
    if cfg.model.nb_classes is not None:
        if cfg.model.nb_classes < num_classes:
            raise UserError(f"--nb_classes {cfg.model.nb_classes} is fewer than the {num_classes} classes of the "
                            f"training data")
        num_classes = cfg.model.nb_classes
    task, report = build_task(cfg, ckpt, num_classes, text_tokenizer, dist_util.gather_with_grad, data.class_names)
    freeze_unused(task)
    if cfg.model.lora_rank:
        report.append(adapt_with_lora(task, cfg.model.lora_rank, cfg.model.lora_alpha or cfg.model.lora_rank))
    if dist_util.is_distributed() and ctx.device.type == "cuda":  # BatchNorm over the global batch (mmseg's SyncBN);
        task = torch.nn.SyncBatchNorm.convert_sync_batchnorm(task)  # torch has no CPU SyncBatchNorm
    task.to(ctx.device)
    if cfg.model.grad_checkpointing:
        task.backbone.set_grad_checkpointing(True)
    if cfg.model.fsdp:
        shard(task, task.backbone.blocks)
    if cfg.model.compile:  # after sharding: each compiled block keeps its FSDP hooks outside the graph
        compile_modules(task.backbone.blocks)
    return FinetuneRun(cfg, ctx, task, data, report, text_tokenizer)


def adapt_with_lora(task: DownstreamTask, rank: int, alpha: float) -> str:
    """Adapters on the backbone; the base weights freeze, the task's heads train."""
    from models.lora import add_lora, is_adapter_key, plain_names

    add_lora(task.backbone, rank, alpha)
    for name, param in task.model.named_parameters():
        plain = next(iter(plain_names({name: param})))
        if name.startswith("backbone.") and not is_adapter_key(plain):
            param.requires_grad_(False)
    trained = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    return f"LoRA rank {rank} alpha {alpha:g}: {trained / 1e6:.2f}M trainable parameters (adapters and heads)"


def layer_decay_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float,
                       heads: tuple[str, ...] = ()) -> list[dict]:
    """timm's layer-decay groups; a group holding none of the `heads`' parameters is marked as the
    backbone's (what a linear-probe warm start holds still)."""
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=layer_decay)
    head_params = {id(p) for name in heads for p in getattr(model, name).parameters()}
    for group in groups:
        group["backbone"] = not any(id(p) in head_params for p in group["params"])
    return groups


def hold_backbone(optimizer: torch.optim.Optimizer, held: bool) -> None:
    """LP-FT: the backbone's groups get lr 0 while `held` (their lr_scale is kept aside)."""
    for group in optimizer.param_groups:
        if group.get("backbone"):
            group.setdefault("free_lr_scale", group.get("lr_scale", 1.0))
            group["lr_scale"] = 0.0 if held else group["free_lr_scale"]


def describe_run(run: FinetuneRun) -> None:
    cfg = run.cfg
    if not run.ctx.is_main:
        return
    classes = f"{run.num_classes} classes " if run.num_classes else ""
    say(f"{cfg.task}: {describe(run.task.backbone.cfg)}, {classes}({len(run.data.train)} train / "
          f"{len(run.data.val)} val examples); " + "; ".join(run.report))
    run.ctx.output_dir.mkdir(parents=True, exist_ok=True)
    save_settings(cfg, run.ctx.output_dir, "eval_args.yaml" if cfg.run.eval else "args.yaml")


@dataclass
class Training:
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    settings: StepSettings
    prepare: BatchPreparer
    model_ema: Any
    eff_batch: int
    selection_loader: torch.utils.data.DataLoader | None = None  # where the best epoch is chosen (else val)


def build_training(run: FinetuneRun, model: torch.nn.Module) -> Training:
    cfg, ctx, opt = run.cfg, run.ctx, run.cfg.optim
    train_loader = ctx.loader(run.data.train, opt.batch_size, cfg.data.num_workers, True, run.data.train_collate,
                              seeded_shuffle=False)
    if len(train_loader) == 0:
        raise UserError(f"{len(run.data.train)} training examples are fewer than one batch of {opt.batch_size}; "
                        f"lower --batch_size")
    val_loader = ctx.loader(run.data.val, opt.batch_size, cfg.data.num_workers, False, run.data.val_collate)
    eff_batch = opt.batch_size * opt.accum_iter * ctx.world
    lr = learning_rate(opt.lr, opt.blr, eff_batch)
    optimizer = torch.optim.AdamW(layer_decay_groups(run.task.model, opt.weight_decay, cfg.model.layer_decay,
                                                     run.task.heads), lr=lr, **adamw_options(opt.adamw_impl))
    model_ema = None
    if opt.model_ema:
        from timm.utils import ModelEmaV3

        model_ema = ModelEmaV3(run.task, decay=opt.model_ema_decay)
    settings = StepSettings(lr=lr, min_lr=opt.min_lr, warmup_epochs=opt.warmup_epochs, epochs=opt.epochs,
                            accum_iter=opt.accum_iter, clip_grad=opt.clip_grad, amp_dtype=amp_dtype(cfg.run.amp),
                            print_freq=cfg.run.print_freq, max_bad_samples=cfg.data.max_bad_samples,
                            data_name=f"--data_path {cfg.data.data_path}" + (f" / --data_file_path {cfg.data.data_file_path}"
                                                                             if cfg.data.data_file_path else ""))
    prepare = BatchPreparer(ctx.device, TASK_INPUTS)
    selection_loader = None
    if run.data.selection is not None:
        selection_loader = ctx.loader(run.data.selection, opt.batch_size, cfg.data.num_workers, False,
                                      run.data.val_collate)
    return Training(train_loader, val_loader, optimizer, grad_scaler(cfg.run.amp, ctx.device), settings, prepare,
                    model_ema, eff_batch, selection_loader)


def evaluate_run(run: FinetuneRun, loader, task: DownstreamTask | None = None) -> dict[str, float]:
    """The task's metrics on the held-out set (of `task`, e.g. the EMA copy, instead of the run's).
    Every rank takes part; set-level metrics call the model's parts outside its forward, so a
    sharded model's root is gathered around them."""
    task = task or run.task
    share_main_buffers(task)
    with unsharded_root(task) if task.set_level_metrics else contextlib.nullcontext():
        return evaluate(task, loader, run.ctx.device, BatchPreparer(run.ctx.device, TASK_INPUTS),
                        amp_dtype(run.cfg.run.amp), run.data.val, run.cfg.optim.batch_size)


def write_held_out_outputs(run: FinetuneRun) -> None:
    """The files the task made of its last held-out pass (VQA's results), written by the main process."""
    if not run.ctx.is_main:
        return
    for name, value in run.task.held_out_outputs().items():
        text = json.dumps(value)
        atomic_write(run.ctx.output_dir / name, lambda tmp: Path(tmp).write_text(text))


def format_metrics(stats: dict[str, float]) -> str:
    if "acc1" in stats:
        text = f"acc1 {stats['acc1']:.2f}" + (f"  acc5 {stats['acc5']:.2f}" if "acc5" in stats else "")
        text += f"  loss {stats['loss']:.4f}"
    else:  # per-class entries ("IoU.<class>") are left to per_class_table
        text = "  ".join(f"{k} {v:.3f}" for k, v in stats.items() if "." not in k)
    return text


def per_class_table(stats: dict[str, float]) -> str:
    """One line per class of the per-class metrics ("IoU.<class>"), saying which classes were absent
    (neither in the held-out masks nor predicted: no IoU, left out of the mean); empty when the task
    has none."""
    rows = [(k[len(PER_CLASS_IOU):], v) for k, v in stats.items() if k.startswith(PER_CLASS_IOU)]
    width = max((len(name) for name, _ in rows), default=0)
    lines = [f"  {name:<{width}}  " + (f"IoU {value:6.2f}" if math.isfinite(value) else
                                       "absent (not in the held-out masks, never predicted; not in the mean)")
             for name, value in rows]
    absent = sum(not math.isfinite(v) for _, v in rows)
    return "\n".join(lines + ([f"  mIoU is the mean over the {len(rows) - absent} present classes"] if absent else []))


def save_example_pictures(run: FinetuneRun, log_writer, step: int) -> None:
    """The task's picture of held-out predictions (segmentation: input | truth | prediction), in
    TensorBoard at this step and as pictures/<task>_examples.png (the latest). The main process
    draws it; a sharded model needs every rank for its forward, so every rank calls this."""
    if not (run.ctx.is_main or is_sharded(run.task)):
        return
    with unsharded_root(run.task):
        examples = run.task.example_predictions(run.data.val, run.ctx.device)
    if examples is not None and run.ctx.is_main:
        from visualization.canvas import save_picture
        from visualization.segmentation_pictures import segmentation_panel

        picture = segmentation_panel(**examples, num_classes=run.num_classes)
        save_picture(picture, run.ctx.output_dir / "pictures" / f"{run.cfg.task}_examples.png", log_writer,
                     f"{run.cfg.task}/examples", step)


def save_best(run: FinetuneRun, training: Training, epoch: int, best: "BestEpoch") -> None:
    """checkpoint-best.pth, written by the main process; a sharded model's state is gathered first,
    so every rank calls this."""
    if not (run.ctx.is_main or is_sharded(run.task)):
        return
    cfg, metric = run.cfg, run.task.best_metric
    chosen_by = {f"selection_{metric}": best.chosen} if best.on_selection else {}
    gathered = gathered_state(run.task.model, training.optimizer) if is_sharded(run.task) else None  # every rank
    if not run.ctx.is_main:
        return
    save_run_checkpoint(run.ctx.output_dir, epoch, (epoch + 1) * len(training.train_loader), run.task.model,
                        training.optimizer, training.scaler, run.task.backbone.cfg.to_dict(), flat_settings(cfg),
                        {"num_classes": run.num_classes, f"test_{metric}": best.test, **chosen_by,
                         "class_names": run.data.class_names,
                         "task": cfg.task, **lora_record(cfg)}, name="best", info=run.info(), gathered=gathered)


def lora_record(cfg: FinetuneConfig) -> dict:
    """What loading needs to merge the adapters (export and --eval merge them)."""
    m = cfg.model
    return {"lora": {"rank": m.lora_rank, "alpha": m.lora_alpha or m.lora_rank}} if m.lora_rank else {}


@dataclass
class BestEpoch:
    """The epoch checkpoint-best holds: chosen on the selection split when there is one, else on val;
    or, with `last_epoch`, that epoch (`--checkpoint_epoch last`)."""
    metric: str
    on_selection: bool
    last_epoch: int | None = None
    chosen: float = -1.0  # the value it was chosen by
    test: float = -1.0  # its val-set value (what is reported)
    epoch: int = -1

    def offer(self, epoch: int, test_stats: dict, selection_stats: dict | None) -> bool:
        if self.last_epoch is not None:
            self.chosen = self.test = test_stats[self.metric]
            self.epoch = epoch
            return epoch == self.last_epoch
        value = (selection_stats if self.on_selection else test_stats)[self.metric]
        if value <= self.chosen:
            return False
        self.chosen, self.test, self.epoch = value, test_stats[self.metric], epoch
        return True

    def describe(self) -> str:
        if self.last_epoch is not None:
            return (f"kept the last epoch: test {self.metric} {self.test:.2f}" if self.epoch == self.last_epoch
                    else "keeping the last epoch")
        if not self.on_selection:
            return f"best {self.metric} {self.test:.2f}"
        return f"best epoch {self.epoch} (selection {self.metric} {self.chosen:.2f}): test {self.metric} {self.test:.2f}"


def describe_recipe(run: FinetuneRun, training: Training) -> str:
    cfg, aug = run.cfg, run.cfg.augment
    recipe = (f"mixup {aug.mixup}, cutmix {aug.cutmix}, " if getattr(run.task, "mixup", None) is not None else "")
    recipe += f"smoothing {aug.smoothing}, " if hasattr(run.task, "criterion") else ""
    where = ("the last epoch kept and reported" if cfg.optim.checkpoint_epoch == "last" else
             f"best epoch chosen on {len(run.data.selection)} training images held out"
             if run.data.selection is not None else "best epoch chosen on val")
    return (f"recipe {aug.recipe}: effective batch {training.eff_batch}, lr {training.settings.lr:.3g}, layer decay "
            f"{cfg.model.layer_decay}, {recipe}ema {cfg.optim.model_ema}, amp {cfg.run.amp}, device "
            f"{run.ctx.device}; {where}")


def evaluate_epoch(run: FinetuneRun, training: Training, epoch: int) -> tuple[dict, dict | None]:
    """(val metrics, selection-split metrics or None), checked finite."""
    test_stats = evaluate_run(run, training.val_loader)
    check_evaluation(test_stats, epoch, cause_of(training.settings))
    write_held_out_outputs(run)
    if training.selection_loader is None:
        return test_stats, None
    return test_stats, evaluate_run(run, training.selection_loader)


def train_epochs(run: FinetuneRun, training: Training, model: torch.nn.Module) -> dict[str, Any]:
    cfg, ctx, metric = run.cfg, run.ctx, run.task.best_metric
    log_writer = ctx.tensorboard(cfg.run.log_dir)
    if ctx.is_main:
        say(describe_recipe(run, training))
    best = BestEpoch(metric, training.selection_loader is not None,
                     cfg.optim.epochs - 1 if cfg.optim.checkpoint_epoch == "last" else None)
    stats, skipped, start = {}, 0, time.time()
    n_parameters = sum(p.numel() for p in run.task.parameters() if p.requires_grad)
    for epoch in range(cfg.optim.epochs):
        ctx.start_epoch(training.train_loader, epoch)
        if cfg.optim.lp_epochs:
            hold_backbone(training.optimizer, epoch < cfg.optim.lp_epochs)
        train_stats = train_one_epoch(model, run.task, training.train_loader, training.optimizer, ctx.device, epoch,
                                      training.settings, training.prepare, training.model_ema, training.scaler,
                                      log_writer, skipped)
        skipped += int(train_stats["skipped_samples"])
        test_stats, selection_stats = evaluate_epoch(run, training, epoch)
        stats = {**{f"train_{k}": v for k, v in train_stats.items()}, **{f"test_{k}": v for k, v in test_stats.items()},
                 **{f"selection_{k}": v for k, v in (selection_stats or {}).items()},
                 "epoch": epoch, "n_parameters": n_parameters}
        if training.model_ema is not None:
            ema_stats = evaluate_run(run, training.val_loader, training.model_ema.module)
            stats.update({f"test_ema_{k}": v for k, v in ema_stats.items()})
        # every rank keeps the same best epoch: the held-out metrics are reduced over all ranks
        if best.offer(epoch, test_stats, selection_stats):
            save_best(run, training, epoch, best)
        save_example_pictures(run, log_writer, last_step(epoch + 1))
        if ctx.is_main:
            for key, value in stats.items():
                if key.startswith(("test_", "selection_")) and math.isfinite(value):  # an absent class has no IoU
                    log_writer.add_scalar(key.replace("_", "/", 1), value, last_step(epoch + 1))
            ctx.append_log(stats)
            chosen = f"  selection {format_metrics(selection_stats)}" if selection_stats else ""
            say(f"epoch {epoch}: test {format_metrics(test_stats)}{chosen}  ({best.describe()})  "
                f"{run_eta(start, epoch + 1, cfg.optim.epochs - epoch - 1)}")
    if ctx.is_main:
        say(f"done in {time.time() - start:.0f}s: {best.describe()}; last epoch test {metric} {stats[f'test_{metric}']:.2f}; "
            f"saved {ctx.output_dir / 'checkpoint-best.pth'}")
        table = per_class_table({k[len("test_"):]: v for k, v in stats.items() if k.startswith("test_")})
        if table:
            say("last epoch, per class:\n" + table)
        stats.update({f"best_{metric}": best.test, "best_epoch": best.epoch})
        log_writer.close()
    return stats


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune (or only evaluate, `--eval`) the task; returns the last epoch's statistics and the
    best value of the task's metric. A training run holds its output folder until it ends."""
    ctx = RunContext.start(cfg.run.device, cfg.run.output_dir, cfg.run.seed, exclusive=not cfg.run.eval)
    try:
        ckpt = read_model_checkpoint(cfg.model.finetune) if cfg.model.finetune else None
        if cfg.task_class.cached_features:
            from training.linear_probe import run_linear_probe

            return run_linear_probe(cfg, ctx, ckpt)
        run = build_run(cfg, ctx, ckpt)
        del ckpt  # not held in memory for the whole run
        describe_run(run)
        if cfg.run.eval:
            val_loader = ctx.loader(run.data.val, cfg.optim.batch_size, cfg.data.num_workers, False,
                                    run.data.val_collate)
            stats = evaluate_run(run, val_loader)
            write_held_out_outputs(run)
            table = per_class_table(stats)
            say(f"eval: {format_metrics(stats)}" + (f"\n{table}" if table else ""))
            return stats
        model = run.task if is_sharded(run.task) else ctx.wrap(run.task)
        return train_epochs(run, build_training(run, model), model)
    finally:
        ctx.finish()
