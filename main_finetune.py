"""Downstream fine-tuning (image classification, linear probing, retrieval, text classification).

The downstream task registry lands with the fine-tuning work; today this entry point only
validates its arguments so scripts can be written against it.
"""
from __future__ import annotations

import argparse

from util.errors import UserError, cli_entry

TASKS = ("image_classification", "linear_probe", "image_text_retrieval", "text_classification")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--finetune", help="checkpoint from any stage, or a converted BEiT checkpoint")
    p.add_argument("--data_path", help="data root (ImageFolder train/ and val/ for image tasks)")
    p.add_argument("--output_dir", default="outputs/finetune")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise UserError(f"--task {args.task} is not implemented yet in this version; "
                    f"pretraining (main_pretrain_cook.py) and conversion (util/convert_beit_ckpt.py) are")


if __name__ == "__main__":
    main()
