"""Where a pretraining run's weights come from (nothing, a checkpoint to start a new stage from, or
a run to continue), the backbone built from them, and the heads: the mode's own (loaded when the
checkpoint has them) and those of earlier stages, which travel on unused in this run's checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from common.checkpoint_io import Checkpoint
from common.console import say
from common.errors import UserError
from common.sharded_checkpoint import OPTIMIZER_SHARDS
from training.run_checkpoint import MID_EPOCH
from models import create_model
from models.backbone import VLMoBackbone
from models.checkpoints import read_model_checkpoint
from models.config import check_vl_expert_start
from models.head_loading import built_for_loading, head_names, head_spec, load_head, load_head_into
from models.lora import is_adapter_key
from models.pretrained import fit_text_vocabulary
from training.config import PretrainConfig, replace


@dataclass
class Weights:
    """The checkpoint a run starts from (read once) and whether it is a run to continue."""

    path: str | None = None
    ckpt: Checkpoint | None = None
    continue_run: bool = False


def read_weights(path: str):
    """The checkpoint, read once; what a translation from another layout did is said here."""
    ckpt = read_model_checkpoint(path)
    if ckpt.extra.get("origin"):
        say(f"{path}: a {ckpt.extra['origin']} checkpoint, read in this project's layout: "
              + "; ".join(ckpt.extra.get("conversion_notes") or ["no changes needed"]))
    return ckpt


def continue_lora(cfg: PretrainConfig, ckpt: Checkpoint, path: str) -> PretrainConfig:
    """A LoRA run continues (or is evaluated) as a LoRA run, with its own rank and alpha."""
    saved = ckpt.extra.get("lora") or {}
    if saved and not cfg.lora.lora_rank:
        cfg = replace(cfg, lora={"lora_rank": saved["rank"], "lora_alpha": saved["alpha"]})
        say(f"{path} trained LoRA adapters: using --lora_rank {saved['rank']} --lora_alpha {saved['alpha']:g}")
    elif saved.get("rank", 0) != cfg.lora.lora_rank:
        raise UserError(f"--resume {path} was trained with --lora_rank {saved.get('rank', 0)}, not "
                        f"{cfg.lora.lora_rank}; resume with the run's own flags, or use --init_from to start a new stage")
    return cfg


def resolve_weights(cfg: PretrainConfig) -> tuple[Weights, PretrainConfig]:
    """Says which of init / resume / scratch happens; a LoRA run is continued as a LoRA run."""
    m = cfg.model
    if not m.resume:
        if m.init_from:
            say(f"starting a new stage from the weights of {m.init_from} (fresh optimizer, epoch 0)")
            return Weights(m.init_from, read_weights(m.init_from)), cfg
        return Weights(), cfg
    ckpt = read_weights(m.resume)
    if ckpt.extra.get("foreign_run"):
        say(f"--resume {m.resume} is a {ckpt.extra['origin']} run checkpoint (epoch {ckpt.extra['epoch']}): continuing "
              f"at epoch {ckpt.extra['epoch'] + 1} with a fresh optimizer (its optimizer state belongs to another "
              f"parameter layout)")
    elif "optimizer" not in ckpt.extra and OPTIMIZER_SHARDS not in ckpt.extra:
        say(f"--resume {m.resume} holds weights only: initialising the model from it (new run, epoch 0)")
        return Weights(m.resume, ckpt), cfg
    elif ckpt.extra.get(MID_EPOCH):
        place = ckpt.extra[MID_EPOCH]
        say(f"resuming run from {m.resume} (within epoch {place['epoch']}, after {place['batches_done']} of its batches)")
    else:
        say(f"resuming run from {m.resume} (after epoch {ckpt.extra.get('epoch')})")
    return Weights(m.resume, ckpt, continue_run=True), continue_lora(cfg, ckpt, m.resume)


def build_backbone(cfg: PretrainConfig, weights: Weights, vocab_size: int | None) -> VLMoBackbone:
    m = cfg.model
    overrides = dict(img_size=m.image_size, patch_size=m.patch_size, drop_path_rate=m.drop_path,
                     layer_scale_init_value=m.layer_scale_init_value, ffn=m.ffn,
                     vlffn_start_layer_index=m.vlffn_start_layer_index, vocab_size=vocab_size,
                     max_text_len=cfg.text.max_text_len_of_initckpt)
    if weights.path is None:
        overrides = {k: v for k, v in overrides.items() if v is not None or k != "img_size"}  # the variant's 224
        backbone = create_model(m.model or "vlmo_tiny_patch16", **overrides)
        check_vl_expert_start(backbone.cfg, "--vlffn_start_layer_index")
        return backbone
    weights.ckpt, note = fit_text_vocabulary(weights.ckpt, vocab_size, cfg.text.tokenizer)
    if note:
        say(note)
    model = create_model(m.model, pretrained=weights.path, checkpoint=weights.ckpt,
                         **{k: v for k, v in overrides.items() if k in ("img_size", "drop_path_rate")})
    check_scratch_flags(m, model.cfg, weights.path)
    return model


# flags that shape a model built from scratch: a checkpoint keeps its own (a different value is refused)
SCRATCH_ONLY = {"patch_size": "patch_size", "ffn": "ffn", "layer_scale_init_value": "layer_scale_init_value"}


def check_scratch_flags(m, built, path: str) -> None:
    for flag_name, field_name in SCRATCH_ONLY.items():
        given, kept = getattr(m, flag_name), getattr(built, field_name)
        if given is not None and given != kept:
            raise UserError(f"--{flag_name} {given} shapes a model built from scratch, and {path} has {kept}: a "
                            f"checkpoint keeps its architecture; drop --{flag_name}")


@dataclass
class CarriedHeads:
    """Heads of earlier stages this mode does not train: their tensors and specs (written into every
    checkpoint of this run, so later stages and reports find them) and, for the stage report, the
    modules rebuilt from them."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules: dict[str, nn.Module] = field(default_factory=dict)


# sizes (and the backbone settings a patch aggregation head copies), and how an MAE decoder is
# trained (mask ratio, pixel targets), are the run's own; the rest is the head's layout
RUNS_OWN = ("embed_dim", "vocab_size", "mask_ratio", "norm_pix_loss", "grid")


def _layout(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in (*RUNS_OWN, "backbone")}


def attach_heads(mode: nn.Module, ckpt: Checkpoint | None) -> CarriedHeads:
    """Load the mode's heads that `ckpt` has (rebuilt to the checkpoint's spec when it differs from
    the mode's default); collect the other heads it carries."""
    if ckpt is None:
        return CarriedHeads()
    new = []
    cfg = mode.backbone.cfg
    for name in mode.heads:
        own = getattr(mode, name).spec()
        spec = head_spec(ckpt, name, cfg)
        if spec is not None and _layout(spec) != _layout(own):
            # another layout of the same head (e.g. ContinualTransformer's MIM head with a transform);
            # the sizes stay the run's, so a head for another vocabulary is still refused when loading
            shaped = {**spec, **{k: own[k] for k in RUNS_OWN if k in own}}
            setattr(mode, name, built_for_loading(shaped))
        if load_head_into(getattr(mode, name), ckpt, name):
            say(f"loaded the {name} from {ckpt.path}")
        else:
            new.append(name)
    carried = CarriedHeads()
    for name in head_names(ckpt.model):
        if name in mode.heads:
            continue
        carried.tensors.update({k: v for k, v in ckpt.model.items() if k.split(".")[0] == name and not is_adapter_key(k)})
        spec = head_spec(ckpt, name, cfg)
        if spec is not None:
            carried.specs[name] = spec
            carried.modules[name] = load_head(ckpt, name, cfg)
    say(f"from {ckpt.path}: backbone loaded; new heads: {', '.join(new) or 'none'}; kept unused for later stages: "
          f"{', '.join(sorted({k.split('.')[0] for k in carried.tensors})) or 'none'}")
    return carried
