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

from common.errors import UserError, cli_entry  # noqa: E402
from models.checkpoints import read_model_checkpoint  # noqa: E402
from models.lora import is_adapter_key, plain_names  # noqa: E402
from models.lora_checkpoints import fold_adapters, lora_settings, save_merged_weights  # noqa: E402


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
    ckpt = read_model_checkpoint(args.checkpoint)
    if ckpt.backbone_config is None:
        raise UserError(f"{args.checkpoint} has no backbone config; pass a run checkpoint written by main_pretrain_cook.py")
    merged, had_adapters = fold_adapters(ckpt)  # refuses merged-marked, adapter-only and rank-less files
    if not had_adapters:
        raise UserError(f"{args.checkpoint} holds no LoRA adapters; it is already a plain model")
    settings = lora_settings(ckpt)
    save_merged_weights(output, merged, ckpt.backbone_config, settings, str(args.checkpoint), ckpt.info)
    n = sum(is_adapter_key(k) for k in plain_names(ckpt.model)) // 2
    print(f"merged {n} adapters (rank {settings['rank']}, alpha {settings['alpha']:g}) into {output}")
    return output


if __name__ == "__main__":
    main()
