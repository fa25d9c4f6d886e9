"""Merge a LoRA run checkpoint's adapters into its base weights and write a plain backbone
checkpoint (no adapter keys; heads kept) for the next stage or for downstream fine-tuning.

    python util/save_merged_lora_model.py outputs/s2_mlm/checkpoint-9.pth checkpoints/s2_merged.safetensors
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.lora import is_adapter_key, plain_names  # noqa: E402
from util.checkpoint_io import read_checkpoint  # noqa: E402
from util.errors import UserError, cli_entry  # noqa: E402
from util.lora_checkpoints import is_marked_merged, lora_settings, save_merged_model  # noqa: E402


@cli_entry
def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run checkpoint of a --lora_rank run (checkpoint-N.pth)")
    p.add_argument("output", help=".safetensors (recommended) or .pth")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise UserError(f"{output} exists; pass --overwrite or choose another output")
    ckpt = read_checkpoint(args.checkpoint)
    tensors = plain_names(ckpt.model)
    if not any(is_adapter_key(k) for k in tensors):
        raise UserError(f"{args.checkpoint} holds no LoRA adapters; it is already a plain model")
    if is_marked_merged(ckpt):
        raise UserError(f"{args.checkpoint} is marked as merged but still holds adapters; merging again would count "
                        f"them twice")
    settings = lora_settings(ckpt)
    if not settings or ckpt.backbone_config is None:
        raise UserError(f"{args.checkpoint} lacks the LoRA rank/alpha or the backbone config; pass a run checkpoint "
                        f"written by main_pretrain_cook.py")
    if not any(".blocks." in k and not is_adapter_key(k) for k in tensors):
        raise UserError(f"{args.checkpoint} holds adapters only; merge from the run checkpoint that has the base weights")
    save_merged_model(output, tensors, ckpt.backbone_config, settings, str(args.checkpoint))
    n = sum(is_adapter_key(k) for k in tensors) // 2
    print(f"merged {n} adapters (rank {settings['rank']}, alpha {settings['alpha']:g}) into {output}")
    return output


if __name__ == "__main__":
    main()
