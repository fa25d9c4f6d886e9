"""Does pretraining help dense prediction? Fine-tune semantic segmentation (UPerNet, BEiT's recipe
at tiny size) on the synthetic world's masks from a pretrained checkpoint and from random init with
identical settings, and print one table against the all-background baseline.

    python experiments/segmentation_experiment.py --pretrained outputs/demo_image_mim/checkpoint-9.pth

The scenes and masks are written in ADE20K's layout under OUTPUT_DIR/data and read by the same
reader as real data; the per-class IoU of every run is in its log.txt.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.confusion_matrix import ConfusionMatrix  # noqa: E402
from common.errors import cli_entry  # noqa: E402
from custom_datasets.segmentation_data import pair_files, read_mask, split_folders  # noqa: E402
from custom_datasets.synthetic_segmentation import write_synthetic_segmentation  # noqa: E402
from models.checkpoints import read_model_checkpoint  # noqa: E402
from training.cli import finetune_config_from_argv  # noqa: E402
from training.finetune import finetune  # noqa: E402
from experiments.experiment_runs import finished_or_run, result_settings  # noqa: E402

METRICS = ("mIoU", "mAcc", "aAcc")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="checkpoint of a pretraining run (any stage)")
    p.add_argument("--output_dir", default="outputs/segmentation_experiment", help="the data, one folder per run and "
                   "results.json (default: %(default)s)")
    p.add_argument("--train_scenes", type=int, default=600, help="(default: %(default)s)")
    p.add_argument("--val_scenes", type=int, default=200, help="(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr: above BEiT's 4e-4 for a run of hundreds of steps, not "
                   "160k (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and init (default: %(default)s)")
    p.add_argument("--decoder_channels", type=int, default=64, help="UPerNet width (default: %(default)s)")
    p.add_argument("--num_workers", type=int, default=2, help="data loader processes (default: %(default)s)")
    p.add_argument("--skip_random_init", action="store_true", help="fine-tune only the pretrained backbone (the "
                   "random-init rows do not depend on it: a comparison of several backbones needs them once)")
    return p


def all_background(data: Path, num_classes: int) -> dict[str, float]:
    """The metrics of predicting the background class (0) everywhere on the val masks."""
    matrix = ConfusionMatrix(num_classes)
    for _, mask_path in pair_files(*split_folders(data, "val"))[0]:
        mask = torch.from_numpy(read_mask(mask_path))
        matrix.update(torch.zeros_like(mask), mask)
    return {**matrix.summary(), "background_IoU": 100 * matrix.per_class_iou()[0].item()}


def one_run(args, weights: list[str], common: list[str], out: Path) -> dict:
    command = ["--task", "semantic_segmentation", *common, *weights]
    return finished_or_run(out, lambda: _segment(command, out), result_settings(command))


def _segment(command: list[str], out: Path) -> dict:
    stats = finetune(finetune_config_from_argv(command + ["--output_dir", str(out)]))
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    per_class = {k[len("test_IoU."):]: v for k, v in stats.items() if k.startswith("test_IoU.")}
    return {"best_mIoU": stats["best_mIoU"], **{m: stats[f"test_{m}"] for m in METRICS}, "per_class": per_class,
            "loss_first": log[0]["train_loss"], "loss_last": log[-1]["train_loss"]}


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def print_table(results: dict[str, list[dict]], baseline: dict[str, float], names: list[str]) -> None:
    print("| backbone | mIoU (best epoch) | mIoU (last) | mAcc (last) | pixel acc. (last) | IoU per class (last): "
          + " / ".join(names) + " | train loss, first → last |\n| --- | --- | --- | --- | --- | --- | --- |")
    for init, runs in results.items():
        cells = [spread([r[k] for r in runs]) for k in ("best_mIoU",) + METRICS]
        classes = " / ".join(f"{np.mean([r['per_class'][n] for r in runs]):.1f}" for n in names)
        loss = f"{np.mean([r['loss_first'] for r in runs]):.3f} → {np.mean([r['loss_last'] for r in runs]):.3f}"
        print(f"| {init} | " + " | ".join(cells + [classes, loss]) + " |")
    print(f"| all background | {baseline['mIoU']:.1f} | {baseline['mIoU']:.1f} | {baseline['mAcc']:.1f} | "
          f"{baseline['aAcc']:.1f} | " + " / ".join([f"{baseline['background_IoU']:.1f}"] + ["0"] * (len(names) - 1))
          + " | |")


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    cfg = read_model_checkpoint(args.pretrained).backbone_config or {}
    size = int(cfg.get("img_size", 224))
    out, start = Path(args.output_dir), time.time()
    data = write_synthetic_segmentation(out / "data", args.train_scenes, args.val_scenes, size)
    common = ["--data_path", str(data), "--input_size", str(size), "--epochs", str(args.epochs), "--batch_size", "16",
              "--decoder_channels", str(args.decoder_channels), "--aux_channels", str(args.decoder_channels // 2),
              "--warmup_epochs", "1", "--drop_path", "0", "--num_workers", str(args.num_workers),
              "--print_freq", "1000"] + (["--lr", str(args.lr)] if args.lr else [])
    scratch = ["--model", "vlmo_tiny_patch16", "--patch_size", str(cfg.get("patch_size", 16))]
    results = {}
    inits = [("pretrained", ["--finetune", args.pretrained])] + ([] if args.skip_random_init else [("random init", scratch)])
    for init, weights in inits:
        results[init] = [one_run(args, weights + ["--seed", str(seed)], common,
                                 out / f"{init.replace(' ', '_')}_seed{seed}") for seed in args.seeds]
    names = (data / "class_names.txt").read_text().split()
    baseline = all_background(data, len(names))
    print(f"\nsynthetic scenes: {args.train_scenes} train / {args.val_scenes} val, {size} px, {args.epochs} epochs, "
          f"seeds {args.seeds}, {time.time() - start:.0f}s")
    print_table(results, baseline, names)
    (out / "results.json").write_text(json.dumps({"all_background": baseline, **results}, indent=1))
    return {"all_background": baseline, **results}


if __name__ == "__main__":
    main()
