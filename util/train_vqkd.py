"""Train a VQ-KD visual tokenizer (BEiT v2's semantic MIM targets) on your images, with any model this
project loads as the teacher; the MIM stage then reads it with --d_vae_type vqkd.

    python util/train_vqkd.py --data_path DIR --output checkpoints/vqkd.safetensors \\
        --teacher outputs/demo_chain/3_image_text_itc_lambda_10000/checkpoint-7.pth \\
        --model vqkd_tiny --image_size 64 --patch_size 8 --epochs 10
    python main_pretrain_cook.py --exp_name image_mim --d_vae_type vqkd --d_vae_weight_path checkpoints/vqkd.safetensors \\
        --second_image_size 64 ...
    torchrun --nproc_per_node 2 util/train_vqkd.py ...        # DDP

Writes the tokenizer (.safetensors: encoder, task layer, codebook; teacher and sizes in its metadata),
OUTPUT.tokens.png (held-out images beside their token maps) and OUTPUT.resume.pth (after every
epoch; --resume continues from it). Prints held-out codebook usage and perplexity each epoch."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import UserError, cli_entry  # noqa: E402
from custom_datasets.settings import SYNTHETIC  # noqa: E402
from models.visual_tokenizers.vqkd_vit import VQKD_VARIANTS  # noqa: E402
from training.vqkd_training import VqkdSettings, train_vqkd  # noqa: E402

HELP = {"data_path": "image folder, .npy tiles (with --bands) or 'synthetic'",
        "teacher": "the model whose patch features the tokenizer learns: a checkpoint of any stage, converted BEiT weights",
        "output": "the tokenizer file to write (.safetensors)", "model": f"encoder: {', '.join(VQKD_VARIANTS)}",
        "teacher_layer": "teacher block (1-based) whose patch tokens are the target (default: the last, normed)",
        "restart_below": "restart a code used less than this share of its fair count (EMA)",
        "decay": "EMA decay of the codebook", "resume": "continue from OUTPUT.resume.pth"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(VqkdSettings):
        flag, default = f"--{field.name}", field.default
        if field.type == "bool":
            p.add_argument(flag, action="store_true", help=HELP.get(field.name))
            continue
        kind = {"int": int, "float": float, "int | None": int}.get(field.type, str)
        required = default is dataclasses.MISSING and field.name != "data_path"
        p.add_argument(flag, type=kind, required=required, help=HELP.get(field.name),
                       default=SYNTHETIC if field.name == "data_path" else None if required else default)
    return p


@cli_entry
def main(argv: list[str] | None = None) -> dict[str, float]:
    args = vars(parser().parse_args(argv))
    from conversion.named_weights import resolve

    args["teacher"] = resolve(args["teacher"], "--teacher")  # a registered name, hf-hub: or https:// is fetched
    cfg = VqkdSettings(**args)
    if not cfg.output.endswith(".safetensors"):
        raise UserError(f"--output {cfg.output} must end in .safetensors")
    if Path(cfg.output).exists() and not cfg.resume:
        raise UserError(f"--output {cfg.output} already exists; choose another path (or --resume an unfinished run)")
    for name in ("epochs", "batch_size", "codebook_size", "codebook_dim", "decoder_depth", "image_size", "patch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} {getattr(cfg, name)}: must be at least 1")
    if cfg.codebook_size < 2:
        raise UserError(f"--codebook_size {cfg.codebook_size}: a codebook of one code gives every patch the same token, "
                        f"which leaves MIM nothing to learn; use at least 2 (BEiT v2: 8192)")
    return train_vqkd(cfg)


if __name__ == "__main__":
    main()
