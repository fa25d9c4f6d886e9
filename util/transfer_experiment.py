"""Does pretraining transfer? Fine-tune and linear-probe the same tiny backbone with identical
settings from a pretrained checkpoint and from random init, over several seeds, and print one table
against the majority class.

    python util/transfer_experiment.py --pretrained outputs/demo_image_mim/checkpoint-9.pth \\
        --data_path ../shared/data/hymenoptera

Both use the recipe `main_finetune.py` picks for the data (small_data below 5000 training images:
the best epoch is chosen on held-out training images, so the val accuracy reported for it is
unbiased); the last epoch is reported too.
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

from common.errors import cli_entry  # noqa: E402
from custom_datasets.classification_data import split_roots  # noqa: E402
from custom_datasets.settings import FinetuneDataSettings  # noqa: E402
from models.checkpoints import read_model_checkpoint  # noqa: E402
from training.cli import finetune_config_from_argv  # noqa: E402
from training.finetune import finetune  # noqa: E402

COLUMNS = {"finetune_best": "fine-tune: val top-1 at the selected epoch", "finetune_last": "fine-tune: last epoch",
           "probe_best": "linear probe: selected epoch", "probe_last": "linear probe: last epoch",
           "loss": "fine-tune train loss, first → last epoch"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="checkpoint of a pretraining run (any stage)")
    p.add_argument("--data_path", required=True, help="folder with train/<class>/ and val/<class>/")
    p.add_argument("--output_dir", default="outputs/transfer_experiment", help="one folder per run and results.json "
                   "(default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed and init "
                   "(default: %(default)s)")
    p.add_argument("--finetune_epochs", type=int, default=30, help="(default: %(default)s)")
    p.add_argument("--probe_epochs", type=int, default=90, help="(default: %(default)s)")
    p.add_argument("--num_workers", type=int, default=2, help="data loader processes (default: %(default)s)")
    return p


def majority_accuracy(data_path: str) -> float:
    """Top-1 of always answering the val set's most frequent class."""
    val = split_roots(FinetuneDataSettings(data_path=data_path))[1]
    counts = [sum(1 for f in folder.iterdir() if f.is_file()) for folder in val.iterdir() if folder.is_dir()]
    return 100 * max(counts) / sum(counts)


def one_seed(args, weights: list[str], common: list[str], out: Path) -> dict:
    ft = finetune(finetune_config_from_argv(["--task", "image_classification", "--epochs", str(args.finetune_epochs),
                                             "--output_dir", str(out / "finetune")] + common + weights))
    lp = finetune(finetune_config_from_argv(["--task", "linear_probe", "--epochs", str(args.probe_epochs),
                                             "--output_dir", str(out / "probe")] + common + weights))
    log = [json.loads(line) for line in (out / "finetune" / "log.txt").read_text().splitlines()]
    return {"finetune_best": ft["best_acc1"], "finetune_last": ft["test_acc1"], "probe_best": lp["best_acc1"],
            "probe_last": lp["last_acc1"],
            "loss_first": log[0]["train_loss"], "loss_last": log[-1]["train_loss"]}


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def print_table(results: dict[str, list[dict]], majority: float) -> None:
    print("| backbone | " + " | ".join(COLUMNS.values()) + " |\n|" + " --- |" * (len(COLUMNS) + 1))
    for init, runs in results.items():
        cells = [spread([r[k] for r in runs]) for k in ("finetune_best", "finetune_last", "probe_best", "probe_last")]
        loss = (f"{statistics.mean(r['loss_first'] for r in runs):.3f} → "
                f"{statistics.mean(r['loss_last'] for r in runs):.3f}")
        print(f"| {init} | " + " | ".join(cells + [loss]) + " |")
    print("| majority class | " + " | ".join([f"{majority:.1f}"] * 4) + " | |")


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    cfg = read_model_checkpoint(args.pretrained).backbone_config or {}
    common = ["--data_path", args.data_path, "--input_size", str(cfg.get("img_size", 224)), "--num_workers",
              str(args.num_workers), "--print_freq", "1000"]
    scratch = ["--model", "vlmo_tiny_patch16", "--patch_size", str(cfg.get("patch_size", 16))]
    out, results, start = Path(args.output_dir), {}, time.time()
    for init, weights in (("pretrained", ["--finetune", args.pretrained]), ("random init", scratch)):
        results[init] = [one_seed(args, weights + ["--seed", str(seed)], common,
                                  out / f"{init.replace(' ', '_')}_seed{seed}") for seed in args.seeds]
    majority = majority_accuracy(args.data_path)
    print(f"\n{args.data_path}, {cfg.get('img_size')} px, seeds {args.seeds} (mean ± sample std), "
          f"{time.time() - start:.0f}s")
    print_table(results, majority)
    (out / "results.json").write_text(json.dumps({"majority": majority, **results}, indent=1))
    return results


if __name__ == "__main__":
    main()
