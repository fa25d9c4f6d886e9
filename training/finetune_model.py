"""The model of a downstream run: a backbone (random, or from a checkpoint of any stage) inside the
task's model, the task's heads loaded when the checkpoint already has them (a fine-tuned checkpoint
being evaluated or fine-tuned further), and a report of what was loaded, what is new and what the
checkpoint held that this task does not use."""
from __future__ import annotations

from common.checkpoint_io import Checkpoint
from common.console import say
from common.errors import UserError
from models import create_model
from models.downstream import DownstreamOptions, DownstreamTask, SegmentationOptions
from models.head_loading import head_names, load_head_into
from models.pretrained import fit_text_vocabulary
from training.config import FinetuneConfig


def segmentation_options(cfg: FinetuneConfig, recorded: dict | None) -> SegmentationOptions:
    """From the flags; the decoder's shape, when not given, from the segmentation head the
    checkpoint holds (so --eval and further fine-tuning rebuild the head that was trained)."""
    seg, recorded = cfg.segmentation, recorded or {}
    indices = seg.out_indices or recorded.get("block_indices")
    return SegmentationOptions(decoder_channels=seg.decoder_channels or recorded.get("channels"),
                               aux_channels=seg.aux_channels or recorded.get("aux_channels") or 256,
                               aux_loss_weight=seg.aux_loss_weight, block_indices=tuple(indices) if indices else None,
                               inference=seg.seg_inference, stride=seg.seg_stride, aug_test=seg.aug_test)


def downstream_options(cfg: FinetuneConfig, num_classes: int, recorded_heads: dict | None = None,
                       class_names: list[str] | None = None) -> DownstreamOptions:
    aug = cfg.augment
    return DownstreamOptions(num_classes=num_classes, use_cls=cfg.model.use_cls, smoothing=aug.smoothing,
                             mixup=aug.mixup, cutmix=aug.cutmix, mixup_prob=aug.mixup_prob,
                             mixup_switch_prob=aug.mixup_switch_prob, max_text_len=cfg.data.max_text_len,
                             rerank_k=cfg.data.rerank_k, class_names=tuple(class_names or ()),
                             segmentation=segmentation_options(cfg, (recorded_heads or {}).get("seg_head")))


def make_task(cfg: FinetuneConfig, backbone, num_classes: int, text_tokenizer, gather=None,
              recorded_heads: dict | None = None, class_names: list[str] | None = None) -> DownstreamTask:
    task_cls = cfg.task_class
    options = downstream_options(cfg, num_classes, recorded_heads, class_names)
    if task_cls.name == "image_text_retrieval":
        return task_cls(backbone, options, text_tokenizer=text_tokenizer, gather=gather)
    return task_cls(backbone, options)


def load_task_heads(task: DownstreamTask, ckpt: Checkpoint) -> tuple[list[str], list[str]]:
    """Load the heads `ckpt` already has for this task (same shapes): (report lines, the heads that
    start untrained)."""
    loaded = [f"backbone ({sum(1 for k in ckpt.model if k.startswith('backbone.'))} tensors)"]
    new = []
    for name in task.heads:
        module = getattr(task.model, name)
        own = module.state_dict()
        saved = {k[len(name) + 1:]: v for k, v in ckpt.model.items() if k.startswith(name + ".")}
        if saved and saved.keys() == own.keys() and all(saved[k].shape == own[k].shape for k in own):
            load_head_into(module, ckpt, name)
            loaded.append(name)
        elif own:
            note = (f" (checkpoint has {saved['weight'].shape[0]} classes)"
                    if name == "classifier" and "weight" in saved else "")
            new.append(name + note)
    ignored = sorted(set(head_names(ckpt.model)) - set(task.heads))
    return ([f"loaded: {', '.join(loaded)}", f"new: {', '.join(new) or 'none'}", f"ignored: {', '.join(ignored) or 'none'}"],
            new)


def build_task(cfg: FinetuneConfig, ckpt: Checkpoint | None, num_classes: int, text_tokenizer=None,
               gather=None, class_names: list[str] | None = None) -> tuple[DownstreamTask, list[str]]:
    """(the task with its model, lines saying where its weights came from); `ckpt`: the --finetune
    checkpoint, already read."""
    m = cfg.model
    reads_text = "text" in cfg.task_class.paths
    vocab_size = len(text_tokenizer) if reads_text and text_tokenizer is not None else None
    if ckpt is None:
        backbone = create_model(m.model or "vlmo_tiny_patch16", img_size=m.input_size, patch_size=m.patch_size,
                                drop_path_rate=m.drop_path, **({"vocab_size": vocab_size} if vocab_size else {}))
        return make_task(cfg, backbone, num_classes, text_tokenizer, gather, class_names=class_names), \
            ["random init (no --finetune)"]
    ckpt, note = fit_text_vocabulary(ckpt, vocab_size, cfg.data.tokenizer)
    if note:
        say(note)
    backbone = create_model(m.model, pretrained=m.finetune, checkpoint=ckpt, img_size=m.input_size,
                            drop_path_rate=m.drop_path)
    task = make_task(cfg, backbone, num_classes, text_tokenizer, gather, ckpt.info.get("heads"), class_names)
    report, untrained = load_task_heads(task, ckpt)
    if cfg.run.eval and untrained:
        raise UserError(f"--eval --finetune {m.finetune}: the checkpoint has no trained {', '.join(untrained)} for "
                        f"--task {cfg.task} (it was not fine-tuned for it), so the evaluation would score untrained "
                        f"weights; fine-tune it first (drop --eval), or pass a checkpoint fine-tuned for this task")
    return task, report


def text_tokenizer_for(cfg: FinetuneConfig, ckpt: Checkpoint | None):
    """Text tasks: --tokenizer, else the one the checkpoint recorded, else bert-base-uncased."""
    from models.run_info import tokenizer_from_record
    from models.text_tokenizer import load_text_tokenizer

    if "text" not in cfg.task_class.paths:
        return None
    if cfg.data.tokenizer:
        return load_text_tokenizer(cfg.data.tokenizer)
    record = ckpt.info.get("text_tokenizer") if ckpt is not None else None
    if record:
        say(f"text tokenizer: the one {ckpt.path} recorded ({record.get('name')}, {len(record['vocab'])} tokens)")
        return tokenizer_from_record(record)
    return load_text_tokenizer("bert-base-uncased")
