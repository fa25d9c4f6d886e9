"""Typed run configurations. Each settings dataclass is one group of flags (`common.config_args`
makes the flags from the fields), built once from YAML + flags, validated, and frozen: nothing
changes a config after `pretrain_config` / `finetune_config` return it (later decisions, such as
the visual tokenizer a run fits, make a new config with `dataclasses.replace`)."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config_args import flag, settings_from
from common.errors import UserError
from common.flag_scopes import both, check_scopes, method_reads, mode_reads, when
from custom_datasets.downstream_data import KIND_NEEDS
from custom_datasets.settings import (
    AugmentSettings,
    DataSettings,
    FinetuneDataSettings,
    PretrainDataConfig,
    SegmentationDataSettings,
    TextSettings,
    ViewSettings,
)
from models.config import FFN_KINDS
from models.modes import PRETRAIN_MODES
from models.registry import list_models
from models.visual_tokenizers import KINDS as VISUAL_TOKENIZER_KINDS
from training.continual import CL_METHODS
from training.flag_checks import check_fsdp_launch, check_paths_exist, check_positive, check_pretrain_flags
from training.optim import ADAMW_DEFAULT, ADAMW_IMPLS
from training.recipes import RECIPE_TASKS

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DALL_E_FOLDER = "checkpoints/dall_e_tokenizer_weight"  # where ContinualTransformer keeps OpenAI's encoder.pkl
AMP_CHOICES = ("bf16", "fp16", "none", "auto")
WITH_ADAPTERS = when("runs with --lora_rank above 0", lambda cfg: cfg.lora.lora_rank > 0,
                     "add --lora_rank R (e.g. 64) to train adapters, or drop it")
VISUAL_TOKENS = mode_reads("visual_tokens")
MERGED_ADAPTERS = when("runs with --lora_rank above 0", lambda cfg: cfg.lora.lora_rank > 0,
                       "a full run's checkpoint is already a plain model: drop it, or add --lora_rank R")
AGGREGATION = both(mode_reads("patch_aggregation"),
                   when("runs with --early_layers", lambda cfg: cfg.objectives.early_layers is not None))


def compile_flag():
    """`--compile`, the same in pretraining and fine-tuning."""
    return flag(False, "torch.compile each block (and the DALL-E encoder): same numbers, faster steps after a "
                       "compilation of tens of seconds")


def grad_checkpointing_flag():
    """`--grad_checkpointing`, the same in pretraining and fine-tuning."""
    return flag(False, "recompute block activations in backward to save memory (same numbers, slower steps)")


def fsdp_flag():
    """`--fsdp`, the same in pretraining and fine-tuning."""
    return flag(False, "shard parameters, gradients and optimizer state across the processes torchrun starts "
                       "(torch FSDP2: each block, then the whole model) instead of replicating them (DDP); for "
                       "backbones that do not fit one device. Checkpoints are gathered into one ordinary file")


@dataclass(frozen=True)
class ModelSettings:
    model: str | None = flag(None, "registered backbone variant", choices=list_models(),
                             shown_default="the checkpoint's architecture, or vlmo_tiny_patch16 from scratch")
    init_from: str | None = flag(None, "start a new stage from this checkpoint's weights (converted BEiT, merged, or run)")
    resume: str | None = flag(None, "continue a run checkpoint; a weights-only checkpoint initialises the model")
    auto_resume: bool = flag(False, "continue from the newest checkpoint in --output_dir")
    image_size: int | None = flag(None, "backbone resolution (px)", shown_default="the checkpoint's, else 224")
    patch_size: int | None = flag(None, "patch size of a model built from scratch", shown_default="the model's (16)")
    ffn: str | None = flag(None, "feed-forward layout of a model built from scratch", choices=FFN_KINDS,
                           shown_default="the checkpoint's, else shared")
    vlffn_start_layer_index: int | None = flag(None, "--ffn multiway, a model built from scratch: the first block "
                                                     "whose image-text pairs go through the vision-language expert",
                                               shown_default="the model's (VLMo-base: 10)")
    drop_path: float = flag(0.1, "stochastic depth rate of the last block", "--drop_path_rate")
    layer_scale_init_value: float | None = flag(None, "layer scale of a model built from scratch (0: off)",
                                                shown_default="the model's")
    grad_checkpointing: bool = grad_checkpointing_flag()
    compile: bool = compile_flag()
    fsdp: bool = fsdp_flag()
    sharded_checkpoint: bool = flag(False, "with --fsdp: each process writes its own shards of every checkpoint "
                                           "(a folder checkpoint-N.pth/, torch.distributed.checkpoint) instead of "
                                           "gathering the whole state in one process; it loads like a file, into "
                                           "one process or any number")


@dataclass(frozen=True)
class ObjectiveSettings:
    aggregate_itc: bool = flag(True, "ITC negatives from every rank (gathered with gradients)",
                               action=argparse.BooleanOptionalAction, scope=mode_reads("itc"))
    mim_conduct_prob: float = flag(0.3, "compound_pretrain: probability of MIM at a step", scope=mode_reads("compound"))
    mlm_conduct_prob: float = flag(0.8, "compound_pretrain: probability of MLM at a step", scope=mode_reads("compound"))
    itc_conduct_prob: float = flag(1.0, "compound_pretrain: probability of ITC at a step (skipped when MIM ran)",
                                   scope=mode_reads("compound"))
    itm_conduct_prob: float = flag(0.0, "compound_pretrain: probability of image-text matching at a step (VLMo ITM, "
                                        "hard negatives from the ITC head; 0: off, as ContinualTransformer)",
                                   scope=mode_reads("compound"))
    fused_mlm: bool = flag(False, "compound_pretrain: predict the masked words from the caption fused with its image "
                                  "(VLMo's MLM) instead of from the text alone (ContinualTransformer's)",
                           scope=mode_reads("compound"))
    disable_aggregate_itc: bool = flag(False, "ITC negatives from this rank only (ContinualTransformer's flag; the "
                                              "same as --no-aggregate_itc)", scope=mode_reads("itc"))
    early_layers: int | None = flag(None, "image_mim: BEiT v2's patch aggregation, the top [CLS] with this block's "
                                          "patch tokens (1-based; BEiT v2 base: 9) through --head_layers more blocks "
                                          "also predicts the masked tokens", shown_default="off", minimum=1,
                                     scope=mode_reads("patch_aggregation"))
    head_layers: int = flag(2, "image_mim with --early_layers: blocks of the patch aggregation head", minimum=1,
                            scope=AGGREGATION)
    shared_lm_head: bool = flag(True, "image_mim with --early_layers: the aggregation predicts through the final "
                                      "norm and MIM head (BEiT v2's default) instead of its own",
                                action=argparse.BooleanOptionalAction, scope=AGGREGATION)


@dataclass(frozen=True)
class MAESettings:
    decoder_embed_dim: int | None = flag(None, "image_mae: the decoder's width", minimum=8, scope=mode_reads("mae"),
                                         shown_default="MAE's 512 from ViT-base up, else half the encoder's")
    decoder_depth: int | None = flag(None, "image_mae: the decoder's blocks", minimum=1, scope=mode_reads("mae"),
                                     shown_default="MAE's 8 from ViT-base up, else a quarter of the encoder's")
    decoder_num_heads: int | None = flag(None, "image_mae: the decoder's attention heads", minimum=1,
                                         scope=mode_reads("mae"),
                                         shown_default="MAE's 16 from ViT-base up, else 32 dims a head")
    norm_pix_loss: bool = flag(True, "image_mae: predict each masked patch's pixels normalised by the patch's own mean "
                                     "and variance (MAE's recipe; ContinualTransformer's flag), or the pixels as they "
                                     "are", action=argparse.BooleanOptionalAction, scope=mode_reads("mae"))


@dataclass(frozen=True)
class LoraSettings:
    lora_rank: int = flag(0, "LoRA rank of the adapters on qkv, proj, fc1, fc2 (0: train the backbone fully)", minimum=0)
    lora_alpha: float | None = flag(None, "LoRA alpha; scaling = alpha / rank", shown_default="--lora_rank (scaling 1)",
                                    scope=WITH_ADAPTERS)
    lora_dropout: float = flag(0.0, "dropout on the adapter input", scope=WITH_ADAPTERS)
    trainable_extra: tuple[str, ...] = flag((), "glob patterns of base parameters to train too, e.g. 'blocks.*.norm1.*'",
                                            nargs="*", scope=WITH_ADAPTERS)
    self_regularization: bool = flag(False, "add λ·Σ||W ⊙ ΔW||² to the loss (needs --lora_rank)")
    reg_loss_weight: float = flag(1.0, "λ of --self_regularization, and of the penalty of --cl_method l2, ewc or distill",
                                  scope=method_reads("reg_loss_weight"))
    save_merged_lora_model: bool = flag(False, "at the end write merged_model.safetensors (adapters merged, for the "
                                               "next stage)", scope=MERGED_ADAPTERS)
    lora_trainable: str | None = flag(None, "which LoRA factors train: both, A only or B only (B starts at zero, A "
                                            "random)", choices=("both", "A", "B"),
                                      shown_default="both; B for ITC and compound with --preset continual_transformer",
                                      scope=WITH_ADAPTERS)
    reg_delta: str = flag("scaled", "the update the self-regularization penalises: scaled (alpha/rank x B A, what "
                                    "the model adds) or unscaled (B A, as ContinualTransformer)",
                          choices=("scaled", "unscaled"), scope=method_reads("reg_delta"))


@dataclass(frozen=True)
class ContinualSettings:
    cl_method: str | None = flag(None, "how the stage keeps what earlier stages taught: "
                                 + "; ".join(f"{n}: {m.description}" for n, m in CL_METHODS.items()),
                                 choices=tuple(CL_METHODS),
                                 shown_default="self_reg with --self_regularization, else lora with --lora_rank, else full")
    fisher_samples: int = flag(0, "at the end, estimate the diagonal Fisher information of this stage's objective on "
                                  "about N training samples and write fisher.safetensors beside the checkpoints (what "
                                  "--cl_method ewc in the next stage needs); 0: none", minimum=0)
    replay_ratio: float = flag(0.25, "--cl_method replay: share of each step's samples replayed from the earlier "
                                     "stages (their data, objectives and heads)", minimum=0.01, below=0.99,
                                scope=method_reads("replay_ratio"))
    self_reg_scope: str = flag("adapters", "--cl_method self_reg: what the penalty covers: the adapted linears "
                                           "(ContinualTransformer's), or also every weight the stage trains without "
                                           "adapters that an earlier stage trained (text embeddings, norms), in the "
                                           "same λ·Σ||θ_prev ⊙ Δθ||² form", choices=("adapters", "all"),
                               scope=method_reads("self_reg_scope"))
    wise_alpha: float = flag(0.5, "--cl_method wise: weight of the trained weights in (1 − α)·θ_prev + α·θ_new",
                             minimum=0, maximum=1, scope=method_reads("wise_alpha"))


@dataclass(frozen=True)
class VisualTokenizerSettings:
    """Which tokenizer makes the MIM targets: of a MIM stage, and of the MIM probe in any later stage's
    report (a text stage started from a MIM stage measures what it kept with that stage's tokenizer)."""

    d_vae_type: str | None = flag(None, "MIM target tokenizer", choices=VISUAL_TOKENIZER_KINDS,
                                  shown_default=f"dall-e when {DALL_E_FOLDER}/ holds encoder.pkl, else kmeans")
    d_vae_weight_path: str | None = flag(None, "dall-e: folder with encoder.pkl; kmeans: a fitted .safetensors; "
                                         "vqkd: BEiT v2's vqkd_*.pth or a util/train_vqkd.py .safetensors",
                                         shown_default=f"dall-e: {DALL_E_FOLDER}; kmeans: fit one on the training data")
    second_image_size: int | None = flag(None, "tokenizer view (px)", shown_default="--image_size // 2")
    visual_vocab_size: int | None = flag(None, "visual tokens: clusters of a k-means tokenizer the run fits; with "
                                               "dall-e a check (8192)", "--img_vocab_size", shown_default="256 (kmeans)",
                                         scope=VISUAL_TOKENS)
    tokenizer_fit_images: int = flag(2000, "training images the k-means tokenizer is fitted on", minimum=1,
                                     scope=VISUAL_TOKENS)


def adamw_impl_flag():
    """`--adamw_impl`, the same in pretraining and fine-tuning."""
    return flag(ADAMW_DEFAULT, "AdamW kernels, the same update: auto (torch's choice: foreach on GPU, a loop on "
                               "CPU), for_loop, foreach, or fused (7.5x faster steps on CPU)",
                choices=("auto",) + ADAMW_IMPLS)


@dataclass(frozen=True)
class OptimSettings:
    batch_size: int = flag(64, "samples per device and step", minimum=1)
    accum_iter: int = flag(1, "micro-batches accumulated per optimizer step", minimum=1)
    epochs: int = flag(10, "training epochs", minimum=1)
    blr: float = flag(1.5e-3, "base lr: lr = blr x effective batch / 256")
    lr: float | None = flag(None, "absolute lr (overrides --blr)", shown_default="from --blr")
    min_lr: float = flag(1e-5, "lr at the end of the cosine schedule")
    warmup_epochs: float = flag(1.0, "linear warmup length in epochs")
    warmup_steps: int | None = flag(None, "warmup length in optimizer steps (overrides --warmup_epochs)")
    weight_decay: float = flag(0.05, "AdamW weight decay (not on norms, biases, tokens, position tables)")
    opt_betas: tuple[float, ...] = flag((0.9, 0.999), "AdamW betas", nargs=2)
    clip_grad: float | None = flag(3.0, "gradient norm clipping (0 or none: off)")
    adamw_impl: str = adamw_impl_flag()


@dataclass(frozen=True)
class RunSettings:
    seed: int = flag(0, "random seed (data order, masks, init)")
    device: str = flag(DEFAULT_DEVICE, "cpu or cuda", shown_default="cuda when a GPU is visible, else cpu")
    amp: str | None = flag(None, "mixed precision; auto: bf16 on a GPU, on a CPU whichever of bf16 and fp32 is faster "
                                 "there (timed at start; a CPU without avx512_bf16/AMX emulates bf16, slowly)",
                           choices=AMP_CHOICES, shown_default="bf16 on GPU, none on CPU")
    output_dir: str | None = flag(None, "checkpoints, log.txt, TensorBoard events", shown_default="outputs/<name>")
    log_dir: str | None = flag(None, "TensorBoard folder", shown_default="--output_dir")
    print_freq: int = flag(20, "console progress line every N steps", minimum=1)
    eval: bool = flag(False, "only evaluate the given checkpoint")
    gpu_amp: str = flag("bf16", "the precision --amp means on a GPU when it is not given", choices=("bf16", "fp16"))
    local_rank: int = flag(-1, "set by torch.distributed.launch; the LOCAL_RANK variable decides", "--local-rank")
    dist_url: str = flag("env://", "process-group rendezvous: only env:// (what torchrun and torch.distributed.launch "
                                   "set up)")
    world_size: int | None = flag(None, "a check: the number of processes the launcher started",
                                  shown_default="the launcher's")
    preset: str | None = flag(None, "defaults of another code base; explicit flags and --config still win",
                              choices=("continual_transformer",), shown_default="this project's")


@dataclass(frozen=True)
class PretrainRunSettings(RunSettings):
    save_per_epochs: int = flag(5, "write checkpoint-<epoch>.pth every N epochs (and after the last)", minimum=1)
    save_epochs_from_zero: bool = flag(False, "save epochs 0, N, 2N, ... (ContinualTransformer) instead of N-1, 2N-1, ...")
    save_every_steps: int | None = flag(None, "also write checkpoint-<epoch>-step<batches>.pth every N optimizer steps; "
                                              "--auto_resume continues from one exactly (the same batches and "
                                              "weights as a run never stopped; the loader's workers then restart "
                                              "each epoch)", minimum=1, shown_default="epoch checkpoints only")
    keep_last_checkpoints: int = flag(2, "step checkpoints kept (older ones, and those an epoch checkpoint "
                                         "supersedes, are removed)", minimum=1,
                                      scope=when("runs with --save_every_steps", lambda cfg: cfg.run.save_every_steps))
    no_pictures: bool = flag(False, "do not draw pictures/ at the end of the stage (MIM reconstructions, retrieval "
                                    "examples; also written to TensorBoard)")
    start_epoch: int = flag(0, "epoch a new run starts at (the lr schedule is taken from there); a resumed run "
                               "continues after its checkpoint's epoch")


@dataclass(frozen=True)
class PretrainConfig:
    exp_name: str
    model: ModelSettings
    data: DataSettings
    text: TextSettings
    objectives: ObjectiveSettings
    mae: MAESettings
    lora: LoraSettings
    continual: ContinualSettings
    visual_tokenizer: VisualTokenizerSettings
    views: ViewSettings
    optim: OptimSettings
    run: PretrainRunSettings

    @property
    def mode(self):
        return PRETRAIN_MODES[self.exp_name]

    @property
    def mode_registry(self):
        return PRETRAIN_MODES

    @property
    def method(self):
        """The continual-learning method's class (--cl_method, resolved)."""
        return CL_METHODS[self.continual.cl_method]

    @property
    def method_registry(self):
        return CL_METHODS

    @property
    def data_config(self) -> PretrainDataConfig:
        """What the data builders read."""
        mae = self.mode.image_masks == "mae"  # MAE reads pixels: no tokenizer view
        return PretrainDataConfig(self.data, self.text, self.views, self.model.image_size,
                                  None if mae else self.visual_tokenizer.second_image_size, self.run.seed,
                                  str(Path(self.run.output_dir) / "file_index.txt") if self.run.output_dir else None,
                                  masks=self.mode.image_masks)


PRETRAIN_GROUPS: dict[str, tuple[str, type]] = {
    "model": ("model", ModelSettings), "data": ("data", DataSettings), "text": ("text", TextSettings),
    "objectives": ("image-text contrastive and compound", ObjectiveSettings),
    "mae": ("MAE (image_mae)", MAESettings),
    "lora": ("LoRA and self-regularization", LoraSettings),
    "continual": ("continual-learning method", ContinualSettings),
    "visual_tokenizer": ("visual tokenizer (MIM targets)", VisualTokenizerSettings),
    "views": ("masking and augmentation", ViewSettings), "optim": ("optimisation", OptimSettings),
    "run": ("run", PretrainRunSettings),
}


def replace(config, **groups):
    """A new frozen config with some groups (or fields of one group, as `group={field: value}`) changed."""
    changes = {}
    for name, value in groups.items():
        current = getattr(config, name)
        changes[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
    return dataclasses.replace(config, **changes)


def check_device(run: RunSettings) -> str:
    """The precision to use, after checking the device exists (bf16 on GPU, none on CPU by default;
    on a CPU, a reduced precision is timed against fp32: training/precision.py)."""
    from training.precision import resolve_amp

    if run.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but no GPU is visible; use --device cpu")
    if run.device not in ("cpu",) and not run.device.startswith("cuda"):
        raise UserError(f"--device {run.device} is not a device; use cpu or cuda")
    return resolve_amp(run.amp, run.device, run.gpu_amp)


def resolve_pretrain_defaults(cfg: PretrainConfig) -> PretrainConfig:
    """Defaults that depend on other flags or on files, and ContinualTransformer's spellings."""
    from training import defaults as d

    text, data, views, tok, obj = cfg.text, cfg.data, cfg.views, cfg.visual_tokenizer, cfg.objectives
    data_path, files = d.caption_file_as_data_path(cfg.exp_name, cfg.mode.data_kind, data.data_path, text.data_file_path)
    d.require_data(cfg.exp_name, cfg.mode.data_kind, data_path, files, text.webdataset)
    kind, weights, vocab = d.visual_tokenizer_choice(tok.d_vae_type, tok.d_vae_weight_path, DALL_E_FOLDER,
                                                     tok.visual_vocab_size, cfg.mode.needs_visual_tokens)
    return replace(
        cfg, data={"data_path": data_path, "pin_mem": False if data.no_pin_mem else data.pin_mem},
        text={"data_file_path": files},
        views={"imagenet_default_mean_and_std": views.imagenet_default_mean_and_std
               and not views.disable_imagenet_default_mean_and_std,
               "second_interpolation": views.second_interpolation or ("bicubic" if kind == "vqkd" else "lanczos")},
        objectives={"aggregate_itc": obj.aggregate_itc and not obj.disable_aggregate_itc},
        visual_tokenizer={"d_vae_type": kind, "d_vae_weight_path": weights, "visual_vocab_size": vocab,
                          "second_image_size": tok.second_image_size},
        lora={"lora_alpha": cfg.lora.lora_alpha or cfg.lora.lora_rank or None,
              "lora_trainable": d.lora_factors(cfg.lora.lora_trainable, cfg.run.preset, cfg.exp_name),
              "self_regularization": cfg.lora.self_regularization or cfg.continual.cl_method == "self_reg"},
        continual={"cl_method": d.continual_method(cfg.continual.cl_method, cfg.lora.self_regularization,
                                                   cfg.lora.lora_rank)})


def fetch_named_weights(namespace: argparse.Namespace, flags: tuple[str, ...]) -> None:
    """Weights flags that name weights (a registered name, hf-hub:, https://) become local files,
    fetched and converted once (conversion/named_weights.py); the text tokenizer only by hf-hub: or
    URL (a bare hub name is the tokenizer loader's own, with its local places first)."""
    from conversion.named_weights import HF_PREFIX, resolve

    for name in flags:
        value = getattr(namespace, name, None)
        if name == "tokenizer" and not (value or "").startswith((HF_PREFIX, "https://", "http://")):
            continue
        setattr(namespace, name, resolve(value, f"--{name}"))


def pretrain_config(namespace: argparse.Namespace, planned: frozenset[str] = frozenset(),
                    check_scopes_too: bool = True, fetch: bool = True) -> PretrainConfig:
    """The frozen, validated pretraining config of parsed flags (`planned`: input paths an earlier
    step of an experiment writes, accepted before they exist; `check_scopes_too=False`: settings
    read back from a run's record, not given by a user; `fetch=False`: named weights stay names)."""
    from training.defaults import mode_alias

    if fetch:
        fetch_named_weights(namespace, ("init_from", "d_vae_weight_path", "tokenizer"))
    groups = {name: settings_from(cls, namespace) for name, (_, cls) in PRETRAIN_GROUPS.items()}
    exp_name, lora_changes = mode_alias(namespace.exp_name, groups["lora"].lora_rank)
    groups["lora"] = dataclasses.replace(groups["lora"], **lora_changes)
    cfg = resolve_pretrain_defaults(PretrainConfig(exp_name=exp_name, **groups))
    if check_scopes_too:
        check_scopes(cfg, PRETRAIN_GROUPS, getattr(namespace, "given_flags", {}))
    check_pretrain_flags(cfg, planned)
    run = cfg.run
    out = run.output_dir or f"outputs/{cfg.exp_name}"
    return replace(cfg, run={"output_dir": out, "log_dir": run.log_dir or out, "amp": check_device(run)})


# ---- fine-tuning ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneModelSettings:
    finetune: str | None = flag(None, "checkpoint of any stage (run, merged or converted BEiT, ContinualTransformer's)",
                                "--resume", shown_default="random init")
    model: str | None = flag(None, "variant", choices=list_models(),
                             shown_default="the checkpoint's architecture, or vlmo_tiny_patch16 from scratch")
    patch_size: int | None = flag(None, "patch size of a model built from scratch", shown_default="the model's (16)")
    input_size: int = flag(224, "resolution (px); position tables are interpolated")
    nb_classes: int | None = flag(None, "number of classes", shown_default="the classes of the training data")
    use_cls: bool = flag(False, "classify the [CLS] feature instead of mean-pooled patches (linear_probe: the "
                                "probed block's [CLS], as BEiT v2's patch aggregation trains it)")
    drop_path: float = flag(0.1, "stochastic depth rate of the last block")
    layer_decay: float = flag(0.65, "layer-wise lr decay (1.0: off)")
    probe_layer: int | None = flag(None, "linear_probe: block whose output is probed", shown_default="the last")
    lora_rank: int = flag(0, "parameter-efficient fine-tuning: train LoRA adapters (qkv, proj, fc1, fc2) and the "
                             "task's head only (0: the whole backbone)")
    lora_alpha: float | None = flag(None, "LoRA alpha; scaling = alpha / rank", shown_default="--lora_rank (scaling 1)")
    compile: bool = compile_flag()
    fsdp: bool = fsdp_flag()
    grad_checkpointing: bool = grad_checkpointing_flag()


@dataclass(frozen=True)
class FinetuneOptimSettings:
    batch_size: int = flag(64, "samples per device and step", minimum=1)
    accum_iter: int = flag(1, "micro-batches accumulated per optimizer step", "--update_freq", minimum=1)
    epochs: int = flag(30, "training epochs", minimum=1)
    blr: float | None = flag(None, "base lr: lr = blr x effective batch / 256",
                             shown_default="5e-4 fine-tuning, 0.1 linear probing, 6.4e-3 segmentation (BEiT's 4e-4 "
                                           "at batch 16)")
    lr: float | None = flag(None, "absolute lr (overrides --blr)", shown_default="from --blr")
    min_lr: float = flag(1e-6, "lr at the end of the cosine schedule")
    warmup_epochs: float = flag(5.0, "linear warmup length in epochs")
    weight_decay: float = flag(0.05, "AdamW weight decay")
    clip_grad: float | None = flag(None, "gradient norm clipping", shown_default="off")
    adamw_impl: str = adamw_impl_flag()
    model_ema: bool = flag(False, "keep an exponential moving average of the weights and evaluate it too")
    model_ema_decay: float = flag(0.9999, "EMA decay per optimizer step")
    checkpoint_epoch: str = flag("best", "the epoch checkpoint-best.pth holds and the run reports: the best on the "
                                         "model-selection split (or val), or the last (the end of the cosine "
                                         "schedule: unbiased, and steadier than a choice made on a few dozen images)",
                                 choices=("best", "last"))
    lp_epochs: float = flag(0.0, "linear-probe warm start (LP-FT): for this many epochs only the task's heads train "
                                 "(the backbone's lr is 0), then everything does", minimum=0)


@dataclass(frozen=True)
class SegmentationSettings:
    decoder_channels: int | None = flag(None, "semantic_segmentation: UPerNet width", shown_default="the backbone's "
                                        "width (BEiT: 768 for base); a fine-tuned checkpoint's own")
    aux_channels: int | None = flag(None, "semantic_segmentation: width of the auxiliary FCN head",
                                    shown_default="256 (BEiT)")
    aux_loss_weight: float = flag(0.4, "semantic_segmentation: weight of the auxiliary head's loss")
    out_indices: tuple[int, ...] | None = flag(None, "semantic_segmentation: the four blocks (0-based) the feature "
                                               "pyramid reads", nargs=4, type=int,
                                               shown_default="3 5 7 11 for 12 blocks, the same fractions of others")
    seg_inference: str = flag("slide", "semantic_segmentation held-out inference: overlapping crops of --input_size "
                                       "(BEiT) or the whole image resized to it", choices=("slide", "whole"))
    seg_stride: int | None = flag(None, "semantic_segmentation: sliding-window stride (px)",
                                  shown_default="2/3 of --input_size (BEiT: 341 for 512)")
    aug_test: bool = flag(False, "semantic_segmentation: multi-scale (0.5-1.75) + flip inference")


@dataclass(frozen=True)
class FinetuneConfig:
    task: str
    model: FinetuneModelSettings
    data: FinetuneDataSettings
    augment: AugmentSettings
    optim: FinetuneOptimSettings
    run: RunSettings
    segmentation_data: SegmentationDataSettings = SegmentationDataSettings()
    segmentation: SegmentationSettings = SegmentationSettings()

    @property
    def task_class(self):
        from models.downstream import DOWNSTREAM_TASKS

        return DOWNSTREAM_TASKS[self.task]


FINETUNE_GROUPS: dict[str, tuple[str, type]] = {
    "model": ("model", FinetuneModelSettings), "data": ("data", FinetuneDataSettings),
    "augment": ("augmentation and regularisation", AugmentSettings), "optim": ("optimisation", FinetuneOptimSettings),
    "run": ("run", RunSettings), "segmentation_data": ("semantic segmentation data", SegmentationDataSettings),
    "segmentation": ("semantic segmentation model and inference", SegmentationSettings),
}


SEGMENTATION_BLR = 4e-4 * 256 / 16  # BEiT's ADE20K lr 4e-4 at batch 16


def default_blr(task_class) -> float:
    if task_class.cached_features:
        return 0.1
    return SEGMENTATION_BLR if task_class.data_kind == "segmentation" else 5e-4


def finetune_config(namespace: argparse.Namespace) -> FinetuneConfig:
    """The frozen, validated fine-tuning config of parsed flags."""
    fetch_named_weights(namespace, ("finetune", "tokenizer"))
    groups = {name: settings_from(cls, namespace) for name, (_, cls) in FINETUNE_GROUPS.items()}
    cfg = FinetuneConfig(task=namespace.task, **groups)
    if cfg.run.eval and not cfg.model.finetune:
        raise UserError("--eval needs --finetune CKPT (a fine-tuned checkpoint with its classifier)")
    check_positive({"batch_size": cfg.optim.batch_size, "accum_iter": cfg.optim.accum_iter, "epochs": cfg.optim.epochs,
                    "input_size": cfg.model.input_size})
    if cfg.task_class.data_kind == "segmentation" and cfg.optim.batch_size < 2 and not cfg.run.eval:
        raise UserError("--task semantic_segmentation trains BatchNorm layers, which need --batch_size 2 or more "
                        "(BEiT: 2 per GPU, 16 in all)")
    if not 0 < cfg.model.layer_decay <= 1:
        raise UserError("--layer_decay must be in (0, 1]")
    check_fsdp_launch(cfg.model.fsdp)
    if cfg.model.fsdp and cfg.optim.model_ema:
        raise UserError("--model_ema keeps a whole copy of the model in every process, which --fsdp exists to avoid; "
                        "drop one of them")
    if cfg.model.fsdp and cfg.task_class.cached_features:
        raise UserError(f"--task {cfg.task} trains a linear head on cached features of a frozen backbone: there is "
                        f"nothing to shard; drop --fsdp")
    needs = KIND_NEEDS[cfg.task_class.data_kind]
    if not getattr(cfg.data, needs):
        raise UserError(f"--task {cfg.task} needs --{needs}")
    d = cfg.data
    check_paths_exist({"data_path": d.data_path, "data_file_path": d.data_file_path, "eval_data_path": d.eval_data_path,
                       "eval_data_file_path": d.eval_data_file_path, "finetune": cfg.model.finetune,
                       "tokenizer": d.tokenizer if d.tokenizer and ("/" in d.tokenizer or d.tokenizer.startswith("."))
                       else None})
    selection = d.model_selection_fraction or 0.0
    if not 0 <= selection < 1:
        raise UserError("--model_selection_fraction must be in [0, 1)")
    if d.rerank_k and cfg.task != "image_text_retrieval":
        raise UserError(f"--rerank_k applies to --task image_text_retrieval, not {cfg.task}")
    if d.rerank_k < 0:
        raise UserError("--rerank_k must be 0 (off) or a shortlist size such as 16")
    if selection and cfg.task not in RECIPE_TASKS:  # the image-folder tasks, whose recipe holds the split
        raise UserError(f"--model_selection_fraction applies to --task {' and '.join(RECIPE_TASKS)}; "
                        f"--task {cfg.task} chooses its best epoch on the val set")
    blr = cfg.optim.blr if cfg.optim.blr is not None else default_blr(cfg.task_class)
    out = cfg.run.output_dir or f"outputs/finetune_{cfg.task}"
    return replace(cfg, optim={"blr": blr}, data={"model_selection_fraction": selection},
                   run={"output_dir": out, "log_dir": cfg.run.log_dir or out, "amp": check_device(cfg.run)})
