"""Does pretraining transfer? Fine-tune and linear-probe the same tiny backbone twice with identical
settings: from a pretrained checkpoint and from random init, and print the top-1 table.

    python util/transfer_experiment.py --pretrained outputs/demo_chain/1_image_mim/checkpoint-9.pth \\
        --data_path ../shared/data/hymenoptera
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import cli_entry  # noqa: E402
from models.checkpoints import read_model_checkpoint  # noqa: E402
from training.cli import finetune_config_from_argv  # noqa: E402
from training.finetune import finetune as run_finetune  # noqa: E402


def finetune(argv: list[str]) -> dict:
    return run_finetune(finetune_config_from_argv(argv))


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True)
    p.add_argument("--data_path", required=True)
    p.add_argument("--output_dir", default="outputs/transfer_experiment")
    p.add_argument("--finetune_epochs", type=int, default=30)
    p.add_argument("--probe_epochs", type=int, default=90)
    p.add_argument("--num_workers", type=int, default=2)
    args = p.parse_args(argv)
    cfg = read_model_checkpoint(args.pretrained).backbone_config or {}
    size = ["--input_size", str(cfg.get("img_size", 224)), "--num_workers", str(args.num_workers), "--print_freq", "1000",
            "--batch_size", "32"]
    scratch = ["--model", "vlmo_tiny_patch16", "--patch_size", str(cfg.get("patch_size", 16))]
    out, results, start = Path(args.output_dir), {}, time.time()
    for init, weights in (("pretrained", ["--finetune", args.pretrained]), ("random init", scratch)):
        tag = init.replace(" ", "_")
        ft = finetune(["--task", "image_classification", "--data_path", args.data_path, "--epochs",
                       str(args.finetune_epochs), "--output_dir", str(out / f"finetune_{tag}")] + size + weights)
        lp = finetune(["--task", "linear_probe", "--data_path", args.data_path, "--epochs", str(args.probe_epochs),
                       "--output_dir", str(out / f"probe_{tag}")] + size + weights)
        results[init] = {"finetune_best_acc1": ft["best_acc1"], "finetune_last_acc1": ft["test_acc1"],
                         "probe_best_acc1": lp["best_acc1"]}
    print(f"\n{args.data_path}, {cfg.get('img_size')} px, {time.time() - start:.0f}s")
    print("| backbone | fine-tune top-1 (best / last epoch) | linear probe top-1 (best) |\n| --- | --- | --- |")
    for init, r in results.items():
        print(f"| {init} | {r['finetune_best_acc1']:.1f} / {r['finetune_last_acc1']:.1f} | {r['probe_best_acc1']:.1f} |")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
