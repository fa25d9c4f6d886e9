"""Downstream tasks on the pretrained backbone.

    python main_finetune.py --task image_classification --data_path ../shared/data/hymenoptera \\
        --finetune outputs/demo_image_mim/checkpoint-9.pth --input_size 64 --epochs 30
    python main_finetune.py --task linear_probe --data_path /data/imagenet --finetune merged_model.safetensors
    torchrun --nproc_per_node 8 main_finetune.py --task image_classification --model vlmo_base_patch16 \\
        --finetune checkpoints/beit_base_pt22k.safetensors --data_path /data/imagenet --batch_size 128 \\
        --blr 5e-4 --layer_decay 0.65 --epochs 100 --warmup_epochs 20 --drop_path 0.1 --mixup 0.8 --cutmix 1.0 \\
        --reprob 0.25 --smoothing 0.1 --aa rand-m9-mstd0.5-inc1 --amp bf16 --model_ema
"""
from __future__ import annotations

from common.errors import cli_entry
from training.cli import finetune_config_from_argv, finetune_parser
from training.finetune import finetune


def build_parser():
    return finetune_parser(__doc__)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    return finetune(finetune_config_from_argv(argv, __doc__))


if __name__ == "__main__":
    main()
