"""Continual pretraining of the shared backbone: image MIM, text MLM, image-text contrastive and
their compound, the later stages through LoRA adapters with self-regularization.

    python main_pretrain_cook.py --config configs/demo_image_mim.yaml          # laptop demo, synthetic data
    torchrun --nproc_per_node 8 main_pretrain_cook.py --exp_name image_mim --model vlmo_base_patch16 \\
        --data_path /data/imagenet/train --d_vae_type dall-e --d_vae_weight_path checkpoints/dall_e \\
        --init_from checkpoints/beit_base_pt22k.safetensors --batch_size 64 --amp bf16
    torchrun --nproc_per_node 8 main_pretrain_cook.py --exp_name text_mlm --data_file_path cc3m.json \\
        --tokenizer bert-base-uncased --init_from outputs/image_mim/checkpoint-299.pth \\
        --lora_rank 64 --self_regularization --reg_loss_weight 1.0 --save_merged_lora_model
"""
from __future__ import annotations

from common.errors import cli_entry
from training.cli import pretrain_config_from_argv, pretrain_parser
from training.pretrain import pretrain


def build_parser():
    return pretrain_parser(__doc__)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    return pretrain(pretrain_config_from_argv(argv, __doc__))


if __name__ == "__main__":
    main()
