"""Fit a k-means visual tokenizer on your own images (no download needed).

    python util/fit_visual_tokenizer.py --data_path /data/tiles --output checkpoints/tiles_tokenizer.safetensors \\
        --image_size 224 --second_image_size 112 --vocab_size 1024
    python main_pretrain_cook.py --d_vae_type kmeans --d_vae_weight_path checkpoints/tiles_tokenizer.safetensors ...
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import UserError, cli_entry  # noqa: E402
from custom_datasets.pretrain_data import build_image_datasets  # noqa: E402
from custom_datasets.settings import SYNTHETIC, DataSettings, PretrainDataConfig, TextSettings, ViewSettings  # noqa: E402
from training.visual_tokenizer_fitting import fit_kmeans_tokenizer, save_kmeans_tokenizer  # noqa: E402


@cli_entry
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=SYNTHETIC)
    p.add_argument("--output", required=True, help=".safetensors file to write")
    p.add_argument("--image_size", type=int, default=224, help="backbone resolution")
    p.add_argument("--patch_size", type=int, default=16, help="backbone patch size")
    p.add_argument("--second_image_size", type=int, default=None, help="tokenizer view (default image_size // 2)")
    p.add_argument("--vocab_size", type=int, default=1024, help="number of visual tokens (clusters)")
    p.add_argument("--max_images", type=int, default=5000)
    p.add_argument("--bands", default=None, help=".npy tiles: R,G,B band indices")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise UserError(f"--output {output} must end in .safetensors")
    if output.exists() and not args.overwrite:
        raise UserError(f"--output {output} already exists; pass --overwrite or choose another path")
    for name, low in (("vocab_size", 2), ("max_images", 1), ("num_workers", 0), ("image_size", 1), ("patch_size", 1)):
        if getattr(args, name) < low:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least {low}")
    if args.image_size % args.patch_size:
        raise UserError(f"--image_size {args.image_size} is not a multiple of --patch_size {args.patch_size}")
    grid = args.image_size // args.patch_size
    second = args.second_image_size or args.image_size // 2
    # the training views of a pretraining run at its default augmentation
    data = DataSettings(data_path=args.data_path, val_fraction=0.0, bands=args.bands, synthetic_train_size=args.max_images,
                        synthetic_val_size=1)
    data_cfg = PretrainDataConfig(data, TextSettings(), ViewSettings(mask_strategy="random", mim_probability=0.5),
                                  args.image_size, second, args.seed)
    train_set, _ = build_image_datasets(data_cfg, (grid, grid))
    start = time.time()
    tokenizer = fit_kmeans_tokenizer(train_set, grid, args.vocab_size, args.max_images, seed=args.seed,
                                     num_workers=args.num_workers, vocab_flag="--vocab_size")
    save_kmeans_tokenizer(tokenizer, output, second)
    print(f"wrote {output}: {args.vocab_size} tokens, {grid}x{grid} grid at {second}px "
          f"({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
