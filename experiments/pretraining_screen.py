"""Which pretraining recipe gives the most transfer per CPU-hour on one's own images? Run image MIM
once per recipe (a name and the flags it changes from --config), keep a checkpoint every --every
epochs, and score each checkpoint the cheap way, with the backbone frozen: logistic regression and
k-nearest neighbours on its mean-pooled last-block features of a labelled folder (fitted on the
transfer experiment's training images, the one hyperparameter chosen on its selection split,
scored on val), next to the same on a random init's features and on raw pixels.

    python experiments/pretraining_screen.py --data_path DIR --labelled ../shared/data/hymenoptera \\
        --recipe base= --recipe "mask 0.5=--num_mask_patches 32" --recipe "vocab 512=--visual_vocab_size 512"

The CPU time of each run (its processes and their loader workers) is measured; a checkpoint's cost
is that time pro rata to its epoch ("≥" where a run was resumed: its interrupted part is not
counted). A recipe may set its own --epochs (a longer schedule is another
recipe: its learning rate decays over its own length). Runs are reused when finished (rerun the command to continue).
Confirm the winner with experiments/transfer_experiment.py (fine-tuning, several seeds): a frozen probe
ranks recipes, it does not measure fine-tuning."""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.errors import UserError, cli_entry  # noqa: E402
from training.flag_checks import check_paths_exist  # noqa: E402
from experiments.experiment_runs import run_script  # noqa: E402
from experiments.transfer_experiment import baseline_splits, frozen_features  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COST = "run_cost.json"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True, help="the unlabelled images to pretrain on")
    p.add_argument("--labelled", required=True, help="folder with train/<class>/ and val/<class>/ to score on")
    p.add_argument("--recipe", action="append", required=True, metavar="NAME=FLAGS",
                   help="a recipe: its name, '=', and the main_pretrain_cook.py flags it changes (may be empty)")
    p.add_argument("--config", default=str(ROOT / "configs/small_data_image_mim.yaml"), help="(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=50, help="(default: %(default)s)")
    p.add_argument("--every", type=int, default=10, help="a checkpoint scored every N epochs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--num_workers", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--output_dir", default="outputs/pretraining_screen", help="(default: %(default)s)")
    return p


def recipes(specs: list[str]) -> dict[str, list[str]]:
    out = {}
    for spec in specs:
        name, sep, flags = spec.partition("=")
        if not sep or not re.fullmatch(r"[\w .,-]+", name):
            raise UserError(f"--recipe {spec!r}: write NAME=FLAGS, the name in letters, digits, spaces, '.', ',' or '-'")
        if name in out:
            raise UserError(f"--recipe {name!r} is given twice: give each recipe its own name")
        out[name] = shlex.split(flags)
    return out


def recipe_argv(args, out: Path, flags: list[str]) -> list[str]:
    """main_pretrain_cook.py's flags for one recipe."""
    return ["--config", args.config, "--data_path", args.data_path, "--epochs", str(args.epochs), "--save_per_epochs",
            str(args.every), "--seed", str(args.seed), "--num_workers", str(args.num_workers), "--no_pictures",
            "--auto_resume", "--output_dir", str(out), *flags]


def recipe_folder(args, name: str) -> Path:
    return Path(args.output_dir) / name.replace(" ", "_")


def check_every_recipe(args, recipes_flags: dict[str, list[str]]) -> None:
    """Every recipe's run, checked as it would be before it starts: a bad flag in the last recipe is
    refused now, not after the others trained."""
    from training.cli import check_planned_pretrain_run

    for name, flags in recipes_flags.items():
        try:
            check_planned_pretrain_run(recipe_argv(args, recipe_folder(args, name), flags))
        except UserError as err:
            raise UserError(f"--recipe {name!r} would be refused: {err}") from None


def pretrain(args, name: str, flags: list[str]) -> dict:
    """Run one recipe unless it finished before; its CPU and wall seconds."""
    out = recipe_folder(args, name)
    if (out / COST).is_file():
        return json.loads((out / COST).read_text())
    out.mkdir(parents=True, exist_ok=True)
    resumed = any(out.glob("checkpoint-*.pth"))  # its earlier part ran in another process: not counted
    ran = run_script([str(ROOT / "main_pretrain_cook.py"), *recipe_argv(args, out, flags)], out / "output.txt",
                     append=True)
    cost = {"cpu_seconds": ran["cpu_seconds"], "wall_seconds": ran["seconds"], "complete": not resumed}
    (out / COST).write_text(json.dumps(cost))
    return cost


def frozen_scores(features: tuple, num_classes: int, name: str) -> dict[str, float]:
    """Val top-1 of the transfer experiment's two baselines on these (train, selection, val) features."""
    from experiments.baselines import baseline_rows

    rows = baseline_rows({name: features}, num_classes)
    return {"logistic": rows[f"logistic regression on {name}"]["acc1"],
            "knn": rows[f"k-nearest neighbours on {name}"]["acc1"]}


def score_checkpoints(args, name: str, cost: dict) -> list[dict]:
    """One row per kept checkpoint: epochs, CPU minutes to it, held-out MIM accuracy, frozen scores."""
    from models import VLMoBackbone
    from models.checkpoints import read_model_checkpoint
    from models.pretrained import config_from_checkpoint, load_backbone_weights

    out = Path(args.output_dir) / name.replace(" ", "_")
    log = {r["epoch"]: r for r in map(json.loads, (out / "log.txt").read_text().splitlines()) if "epoch" in r}
    rows, data = [], None
    for path in sorted(out.glob("checkpoint-*.pth"), key=lambda p: int(p.stem.split("-")[1])):
        epoch = int(path.stem.split("-")[1])
        ckpt = read_model_checkpoint(path)
        backbone = VLMoBackbone(config_from_checkpoint(ckpt))
        load_backbone_weights(backbone, str(path), ckpt)
        if data is None:
            data, num_classes = baseline_splits(args.labelled, backbone.cfg.img_size)
            torch.manual_seed(args.seed)
            rows.append({"recipe": name, "epochs": 0, "cpu_minutes": 0.0, "mim_acc": None,  # its random init
                         **frozen_scores(frozen_features(VLMoBackbone(backbone.cfg), data), num_classes, "features")})
        rows.append({"recipe": name, "epochs": epoch + 1, "cpu_complete": cost["complete"],
                     "cpu_minutes": round(cost["cpu_seconds"] / 60 * (epoch + 1) / len(log), 1),
                     "mim_acc": log.get(epoch, {}).get("test_acc_mim"),
                     **frozen_scores(frozen_features(backbone, data), num_classes, "features")})
    return rows


def pixel_scores(labelled: str, image_size: int) -> dict[str, float]:
    from experiments.baselines import pixel_features

    data, num_classes = baseline_splits(labelled, image_size)
    return frozen_scores(tuple(pixel_features(d) for d in data), num_classes, "raw pixels")


def table(rows: list[dict], flags: dict[str, list[str]], pixels: dict[str, float]) -> str:
    lines = ["| recipe | flags | epochs | CPU minutes | held-out MIM acc | logistic regression on features: val top-1 "
             "| k-NN on features: val top-1 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        mim = "" if r["mim_acc"] is None else f"{r['mim_acc']:.3f}"
        label = "0 (random init)" if r["epochs"] == 0 else str(r["epochs"])
        cpu = ("" if r.get("cpu_complete", True) else "≥ ") + f"{r['cpu_minutes']:.1f}"  # resumed: part uncounted
        lines.append(f"| {r['recipe']} | `{' '.join(flags[r['recipe']]) or '(config)'}` | {label} | "
                     f"{cpu} | {mim} | {r['logistic']:.1f} | {r['knn']:.1f} |")
    lines.append(f"| raw pixels | | | | | {pixels['logistic']:.1f} | {pixels['knn']:.1f} |")
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    check_paths_exist({"data_path": args.data_path, "labelled": args.labelled, "config": args.config})
    if args.every < 1 or args.epochs % args.every:
        raise UserError(f"--every {args.every} must divide --epochs {args.epochs} (a checkpoint at the last epoch)")
    flags = recipes(args.recipe)
    check_every_recipe(args, flags)
    costs = {name: pretrain(args, name, f) for name, f in flags.items()}
    rows = [row for name in flags for row in score_checkpoints(args, name, costs[name])]
    from models.checkpoints import read_model_checkpoint

    first = next((Path(args.output_dir) / next(iter(flags)).replace(" ", "_")).glob("checkpoint-*.pth"))
    pixels = pixel_scores(args.labelled, (read_model_checkpoint(first).backbone_config or {}).get("img_size", 224))
    text = table(rows, flags, pixels)
    print(text)
    out = Path(args.output_dir)
    (out / "results.json").write_text(json.dumps({"rows": rows, "costs": costs, "pixels": pixels,
                                                  "flags": flags}, indent=1))
    (out / "table.md").write_text(text + "\n")
    return {"rows": rows, "costs": costs, "pixels": pixels}


if __name__ == "__main__":
    main()
