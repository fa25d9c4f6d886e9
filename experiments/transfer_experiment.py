"""Does pretraining pay? Fine-tune and linear-probe the same tiny backbone with identical settings
from a pretrained checkpoint and from random init, over several seeds, and print them next to the
baselines any user would try first, all on the same split: logistic regression and k-nearest
neighbours on raw pixels and on a random init's frozen features, and the majority class.

    python experiments/transfer_experiment.py --pretrained outputs/demo_image_mim/checkpoint-9.pth \\
        --data_path ../shared/data/hymenoptera

`--data_path synthetic` writes the synthetic world's labelled scenes (400 train / 400 val, colour
of the first object, 8 classes) under --output_dir and adds the best accuracy any classifier can
reach on them (two-object scenes do not show which object is first).

Both use the recipe `main_finetune.py` picks for the data (small_data below 5000 training images).
The baselines fit on the fine-tuning run's training images, choose their one hyperparameter on its
model-selection images (20% of the training folder, held out by file name) and are scored on val.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.errors import UserError, cli_entry  # noqa: E402
from custom_datasets.classification_data import split_roots  # noqa: E402
from custom_datasets.settings import FinetuneDataSettings  # noqa: E402
from models.checkpoints import read_model_checkpoint  # noqa: E402
from training.cli import check_planned_finetune_run, finetune_config_from_argv  # noqa: E402
from training.finetune import finetune  # noqa: E402
from experiments.experiment_runs import finished_or_run, result_settings  # noqa: E402

SYNTHETIC_SIZES = (400, 400)  # labelled train / val scenes for --data_path synthetic
SYNTHETIC_SEED = 1  # which scenes: the ceiling is computed on the very scenes written
COLUMNS = {"finetune": "fine-tune: val top-1 (the recipe's epoch)", "finetune_train": "fine-tune: train top-1, "
           "last epoch", "probe": "linear probe: val top-1 (the recipe's epoch)",
           "loss": "fine-tune train loss, first → last epoch"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="checkpoint of a pretraining run (any stage)")
    p.add_argument("--data_path", required=True, help="folder with train/<class>/ and val/<class>/, or 'synthetic'")
    p.add_argument("--output_dir", default="outputs/transfer_experiment", help="one folder per run and results.json "
                   "(default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed and init "
                   "(default: %(default)s)")
    p.add_argument("--finetune_epochs", type=int, default=30, help="(default: %(default)s)")
    p.add_argument("--probe_epochs", type=int, default=90, help="(default: %(default)s)")
    p.add_argument("--finetune_flags", default="", help="more main_finetune.py flags for the fine-tuning runs, "
                   "quoted as one argument (e.g. \"--blr 1e-2 --layer_decay 0.9\"): to measure a recipe change")
    p.add_argument("--probe_flags", default="", help="more main_finetune.py flags for the linear probes, quoted "
                   "as one argument (e.g. \"--use_cls\": probe the [CLS] token, as BEiT v2 does)")
    p.add_argument("--skip_random_init", action="store_true", help="fine-tune and probe only the pretrained backbone "
                   "(the random-init runs of an earlier experiment on the same data, seeds and flags are the same runs)")
    p.add_argument("--num_workers", type=int, default=2, help="data loader processes (default: %(default)s)")
    return p


def flags_value_joined(argv: list[str]) -> list[str]:
    """`--probe_flags --use_cls` as `--probe_flags=--use_cls`: argparse takes a value that looks
    like a flag of its own (one word starting with '-') for a missing value."""
    joined, rest = [], iter(argv)
    for arg in rest:
        value = next(rest, None) if arg in ("--finetune_flags", "--probe_flags") else None
        joined.append(arg if value is None else f"{arg}={value}")  # a missing value stays argparse's error
    return joined


def labelled_data(args, image_size: int) -> tuple[str, float | None]:
    """(the folder to fine-tune on, the best accuracy possible on its val split when known)."""
    if args.data_path != "synthetic":
        return args.data_path, None
    from custom_datasets.synthetic_classification import best_possible_accuracy, scenes, write_synthetic_classification

    root = write_synthetic_classification(Path(args.output_dir) / "synthetic_data", *SYNTHETIC_SIZES, image_size,
                                          SYNTHETIC_SEED)
    val = scenes("val", SYNTHETIC_SIZES[1], SYNTHETIC_SEED, single_object=False)
    return str(root), best_possible_accuracy([scene for _, scene in val])


def baseline_splits(data_path: str, image_size: int) -> tuple[tuple, int]:
    """(train, selection, val) as the fine-tuning runs split the folder, all in the held-out view,
    and the number of classes."""
    from custom_datasets.classification_data import build_classification_datasets, eval_transform
    from training.recipes import SMALL_DATA

    view = eval_transform(image_size)
    train, val, selection = build_classification_datasets(
        FinetuneDataSettings(data_path=data_path, model_selection_fraction=SMALL_DATA["model_selection_fraction"]),
        view, view)
    return (train, selection, val), len(train.class_to_idx)


def frozen_features(backbone, splits: tuple) -> tuple:
    """Each split's mean-pooled last-block features `Split(x, y)`."""
    from experiments.baselines import Split
    from training.linear_probe import extract_features

    last = backbone.cfg.depth - 1
    return tuple(Split(*extract_features(backbone.eval(), d, last, 64, torch.device("cpu"))) for d in splits)


def baseline_results(data_path: str, cfg: dict, seeds: list[int]) -> dict[str, list[dict]]:
    """The baselines on the fine-tuning split: raw pixels once (nothing random in them), a random
    init's mean-pooled last-block features once per seed."""
    from models import BackboneConfig, VLMoBackbone
    from experiments.baselines import baseline_rows, pixel_features

    splits, num_classes = baseline_splits(data_path, cfg.get("img_size", 224))
    results = {name: [row] for name, row in baseline_rows(
        {"raw pixels": tuple(pixel_features(d) for d in splits)}, num_classes).items()}
    for seed in seeds:
        torch.manual_seed(seed)
        backbone = VLMoBackbone(BackboneConfig.from_dict(cfg))  # the pretrained architecture, random weights
        for name, row in baseline_rows({"random-init features": frozen_features(backbone, splits)}, num_classes).items():
            results.setdefault(name, []).append(row)
    return results


def majority_accuracy(data_path: str) -> float:
    """Top-1 of always answering the val set's most frequent class."""
    val = split_roots(FinetuneDataSettings(data_path=data_path))[1]
    counts = [sum(1 for f in folder.iterdir() if f.is_file()) for folder in val.iterdir() if folder.is_dir()]
    return 100 * max(counts) / sum(counts)


def seed_commands(args, weights: list[str], common: list[str]) -> dict[str, list[str]]:
    return {"finetune": ["--task", "image_classification", "--epochs", str(args.finetune_epochs), *common, *weights,
                         *shlex.split(args.finetune_flags)],
            "probe": ["--task", "linear_probe", "--epochs", str(args.probe_epochs), *common, *weights,
                      *shlex.split(args.probe_flags)]}


def check_every_run(args, inits: list[tuple[str, list[str]]], common: list[str]) -> None:
    """Every fine-tuning and probe command, checked as it would be before it runs: a bad
    --probe_flags is refused now, not after every seed's fine-tuning."""
    for init, weights in inits:
        for name, argv in seed_commands(args, weights + ["--seed", str(args.seeds[0])], common).items():
            try:
                check_planned_finetune_run(argv)
            except UserError as err:
                raise UserError(f"the {init} {name} runs would be refused: {err}") from None


def one_seed(args, weights: list[str], common: list[str], out: Path) -> dict:
    commands = seed_commands(args, weights, common)
    settings = {name: result_settings(argv) for name, argv in commands.items()}
    return finished_or_run(out, lambda: _fine_tune_and_probe(commands, out), settings)


def _fine_tune_and_probe(commands: dict[str, list[str]], out: Path) -> dict:
    ft = finetune(finetune_config_from_argv(commands["finetune"] + ["--output_dir", str(out / "finetune")]))
    lp = finetune(finetune_config_from_argv(commands["probe"] + ["--output_dir", str(out / "probe")]))
    log = [json.loads(line) for line in (out / "finetune" / "log.txt").read_text().splitlines()]
    return {"finetune": ft["best_acc1"], "finetune_last": ft["test_acc1"], "finetune_train": log[-1].get("train_acc1"),
            "probe": lp["best_acc1"], "probe_last": lp["last_acc1"],
            "loss_first": log[0]["train_loss"], "loss_last": log[-1]["train_loss"]}


def mean(values: list[float]) -> float:
    return statistics.mean(values)


def spread(values: list[float]) -> str:
    return f"{mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def verdict(results: dict[str, list[dict]], baselines: dict[str, list[dict]]) -> str:
    """One sentence: does the pretrained backbone, fine-tuned, beat the best baseline and random
    init by more than the seeds' spread?"""
    pre = [r["finetune"] for r in results["pretrained"]]
    rivals = {name: [r["acc1"] for r in runs] for name, runs in baselines.items()}
    if "random init" in results:
        rivals["fine-tuned random init"] = [r["finetune"] for r in results["random init"]]
    name, values = max(rivals.items(), key=lambda kv: mean(kv[1]))
    margin = mean(pre) - mean(values)
    noise = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in (pre, values))
    lead = f"the best rival ({name}, {mean(values):.1f})"
    if margin > noise:
        return (f"the pretrained backbone, fine-tuned, beats {lead} by {margin:+.1f} points, more than the larger seed "
                f"spread (sample std {noise:.1f})")
    return (f"the pretrained backbone, fine-tuned, does not clearly beat {lead}: {margin:+.1f} points, within the larger "
            f"seed spread (sample std {noise:.1f})")


def print_table(results: dict[str, list[dict]], majority: float, baselines: dict[str, list[dict]],
                ceiling: float | None, conclusion: str) -> None:
    print("| backbone | " + " | ".join(COLUMNS.values()) + " |\n|" + " --- |" * (len(COLUMNS) + 1))
    for init, runs in results.items():
        cells = [spread([r[k] for r in runs]) if runs[0][k] is not None else "" for k in list(COLUMNS)[:3]]
        loss = f"{mean([r['loss_first'] for r in runs]):.3f} → {mean([r['loss_last'] for r in runs]):.3f}"
        print(f"| {init} | " + " | ".join(cells + [loss]) + " |")
    print("\n| baseline (same training images, tuned on the same selection split) | val top-1 | chosen |\n"
          "| --- | --- | --- |")
    for name, runs in baselines.items():
        print(f"| {name} | {spread([r['acc1'] for r in runs])} | {', '.join(sorted({r['chosen'] for r in runs}))} |")
    print(f"| majority class | {majority:.1f} | |")
    if ceiling is not None:
        print(f"| best possible (ambiguous scenes are a coin flip) | {ceiling:.1f} | |")
    print("\n" + conclusion)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(flags_value_joined(sys.argv[1:] if argv is None else argv))
    if len(args.seeds) != len(set(args.seeds)):
        raise UserError(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed: give each once")
    cfg = read_model_checkpoint(args.pretrained).backbone_config or {}
    start = time.time()
    data_path, ceiling = labelled_data(args, cfg.get("img_size", 224))
    common = ["--data_path", data_path, "--input_size", str(cfg.get("img_size", 224)), "--num_workers",
              str(args.num_workers), "--print_freq", "1000"]
    scratch = ["--model", "vlmo_tiny_patch16", "--patch_size", str(cfg.get("patch_size", 16))]
    out, results = Path(args.output_dir), {}
    inits = [("pretrained", ["--finetune", args.pretrained])] + ([] if args.skip_random_init else [("random init", scratch)])
    check_every_run(args, inits, common)
    for init, weights in inits:
        results[init] = [one_seed(args, weights + ["--seed", str(seed)], common,
                                  out / f"{init.replace(' ', '_')}_seed{seed}") for seed in args.seeds]
    majority = majority_accuracy(data_path)
    baselines = baseline_results(data_path, cfg, args.seeds)
    print(f"\n{args.data_path}, {cfg.get('img_size')} px, seeds {args.seeds} (mean ± sample std), "
          f"{time.time() - start:.0f}s")
    conclusion = verdict(results, baselines)
    print_table(results, majority, baselines, ceiling, conclusion)
    summary = {"majority": majority, "best_possible": ceiling, **results, "baselines": baselines,
               "verdict": conclusion}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
