"""Flag values and combinations a user can get wrong, checked before any expensive work."""
from __future__ import annotations

from typing import TYPE_CHECKING

from common.errors import UserError
from custom_datasets.sources import source_for

if TYPE_CHECKING:
    from training.config import PretrainConfig


def check_weight_flags(cfg: "PretrainConfig") -> None:
    m = cfg.model
    if m.resume and m.init_from:
        raise UserError("--resume and --init_from both given; --resume continues a run, --init_from starts a new stage")
    if cfg.run.eval and not (m.resume or m.init_from):
        raise UserError("--eval needs a checkpoint: pass --resume or --init_from")
    if m.vlffn_start_layer_index is not None and (m.ffn != "multiway" or m.resume or m.init_from):
        raise UserError("--vlffn_start_layer_index places the vision-language expert of a model built from scratch "
                        "with --ffn multiway; add --ffn multiway (a checkpoint keeps its own layout; convert BEiT "
                        "weights with util/convert_beit_ckpt.py --ffn multiway --vlffn_start_layer_index N)")


def check_lora_flags(cfg: "PretrainConfig") -> None:
    lora = cfg.lora
    if cfg.exp_name in ("image_mim", "image_mae") and lora.lora_rank and not (cfg.model.init_from or cfg.model.resume):
        raise UserError(f"--lora_rank adapts a stage started from earlier weights; a first {cfg.exp_name} stage "
                        f"trains the backbone fully: drop --lora_rank, or start from a stage's weights with --init_from")
    if lora.self_regularization and not lora.lora_rank:
        raise UserError("--self_regularization regularizes LoRA updates; add --lora_rank R (e.g. 64)")
    if lora.lora_rank < 0 or (lora.lora_alpha is not None and lora.lora_alpha <= 0):
        raise UserError("--lora_rank must be >= 0 and --lora_alpha > 0")


def check_data_flags(cfg: "PretrainConfig") -> None:
    text, mode = cfg.text, cfg.mode
    # a ContinualTransformer run checkpoint carries its DALL-E encoder (checked when it is read)
    carries_encoder = cfg.model.resume or cfg.model.init_from or cfg.model.auto_resume
    if mode.needs_visual_tokens and cfg.visual_tokenizer.d_vae_type == "dall-e" \
            and not cfg.visual_tokenizer.d_vae_weight_path and not carries_encoder:
        raise UserError("--d_vae_type dall-e needs --d_vae_weight_path DIR holding OpenAI's encoder.pkl")
    if text.webdataset and mode.data_kind != "pair":
        raise UserError(f"--webdataset holds image-text pairs; {cfg.exp_name} does not read pairs (use image_text_itc "
                        f"or compound_pretrain)")
    if not 1 < text.max_text_len <= text.max_text_len_of_initckpt:
        raise UserError(f"--max_text_len {text.max_text_len} must be between 2 and --max_text_len_of_initckpt "
                        f"{text.max_text_len_of_initckpt}")
    if text.webdataset and mode.needs_visual_tokens and cfg.visual_tokenizer.d_vae_weight_path is None:
        raise UserError("--webdataset streams its data, so a k-means tokenizer cannot be fitted on it here; fit one "
                        "first with util/fit_visual_tokenizer.py and pass --d_vae_weight_path")
    if not 0 < text.mlm_probability < 1:
        raise UserError("--mlm_probability must be between 0 and 1")
    if text.train_data_upsampling_factors:
        raise UserError("--train_data_upsampling_factors is not supported: write the sources' shards into one list "
                        "for --data_path, repeating a source's shards to sample it more often")


def check_launch_flags(run) -> None:
    """ContinualTransformer's launch flags, where they cannot mean the same here."""
    import os

    if run.dist_url != "env://":
        raise UserError(f"--dist_url {run.dist_url}: processes meet through env:// only; start them with torchrun "
                        f"--nnodes N --node_rank R --master_addr HOST --master_port PORT (or torch.distributed.launch)")
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if run.world_size is not None and run.world_size != launched:
        raise UserError(f"--world_size {run.world_size} but {launched} process(es) were started; start "
                        f"{run.world_size} with torchrun --nproc_per_node (the launcher decides the world size)")


def check_fsdp_launch(fsdp: bool) -> None:
    """--fsdp shards across processes: one started without torchrun has no process group to shard over."""
    import os

    if fsdp and "RANK" not in os.environ:
        raise UserError("--fsdp shards the model across the processes torchrun starts; launch with torchrun "
                        "--nproc_per_node N, or drop --fsdp to train in this one process")


def check_paths_exist(paths: dict[str, object], planned: frozenset[str] = frozenset()) -> None:
    """Inputs are checked before the output folder is (a wrong path is reported as such, not as a
    folder that holds a run). `paths`: flag -> path or paths (None: not given); `planned`: paths an
    earlier step of an experiment will have written by the time this run starts."""
    from pathlib import Path

    from conversion.named_weights import is_remote_name

    for flag_name, value in paths.items():
        for path in ([value] if isinstance(value, str) else list(value or [])):
            if path and str(path) not in planned and not is_remote_name(str(path)) and not Path(path).exists():
                raise UserError(f"--{flag_name} {path} does not exist; check the path")


def check_positive(values: dict[str, float | int | None]) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1")


def check_rates(lr: float | None, blr: float | None) -> None:
    import math

    for name, value in (("lr", lr), ("blr", blr)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{name} {value} is not a learning rate; pass a positive number such as 1e-4")


def check_continual_flags(cfg: "PretrainConfig") -> None:
    from training.continual import CL_METHODS

    name, rank = cfg.continual.cl_method, cfg.lora.lora_rank
    method = CL_METHODS[name]
    if cfg.run.save_every_steps and method.replays:
        raise UserError(f"--save_every_steps cannot be combined with --cl_method {name} yet (the replayed stages' "
                        "data streams are not recorded mid-epoch, so a resume would not be exact); use epoch "
                        "checkpoints (--save_per_epochs) for replay stages")
    if method.adapters == "required" and not rank:
        raise UserError(f"--cl_method {name} trains LoRA adapters; add --lora_rank R (e.g. 64)")
    if method.adapters == "forbidden" and rank:
        raise UserError(f"--cl_method {name} trains the whole backbone; drop --lora_rank {rank}")
    if method.needs_previous and not (cfg.model.init_from or cfg.model.resume):
        raise UserError(f"--cl_method {name} keeps a stage close to the previous stage's weights; pass them with "
                        f"--init_from (a run checkpoint or merged_model.safetensors)")
    if cfg.model.fsdp and cfg.continual.fisher_samples and rank:
        raise UserError("--fisher_samples of a LoRA stage is the Fisher information of its merged weights, whose "
                        "gradients --fsdp never makes (the base weights are frozen); estimate it in a stage without "
                        "--fsdp (DDP), or drop --fisher_samples")


def check_pretrain_flags(cfg: "PretrainConfig", planned: frozenset[str] = frozenset()) -> None:
    check_launch_flags(cfg.run)
    check_fsdp_launch(cfg.model.fsdp)
    check_weight_flags(cfg)
    check_data_flags(cfg)
    # the reader the flags ask for (refused in one sentence when none gives this mode's data) says which
    # local paths it opens and which flag combinations it cannot read
    data, kind = cfg.data_config, cfg.mode.data_kind
    source = source_for(data, kind)
    source.check(data, kind)
    check_paths_exist({**source.inputs(data), "data_file_path": cfg.text.data_file_path,
                       "eval_data_file_path": cfg.text.eval_data_file_path, "init_from": cfg.model.init_from,
                       "resume": cfg.model.resume}, planned)
    check_lora_flags(cfg)
    check_continual_flags(cfg)
    if cfg.model.sharded_checkpoint and not cfg.model.fsdp:
        raise UserError("--sharded_checkpoint writes the shards of an --fsdp run; add --fsdp, or drop "
                        "--sharded_checkpoint (other runs write one ordinary file)")
    check_rates(cfg.optim.lr, cfg.optim.blr)
    check_positive({"batch_size": cfg.optim.batch_size, "accum_iter": cfg.optim.accum_iter,
                    "epochs": cfg.optim.epochs, "image_size": cfg.model.image_size})
