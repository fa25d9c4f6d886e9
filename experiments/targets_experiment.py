"""Which MIM targets teach the most? The same image MIM pretraining (configs/small_data_image_mim.yaml:
the tiny model at 64 px, the same epochs, data and seed) with each kind of visual token, then the
same transfer and segmentation experiments on each backbone:

    kmeans   the run's own k-means tokenizer (colour and extent: what the project used so far)
    vqkd     a VQ-KD tokenizer trained by util/train_vqkd.py on the same images, to reconstruct the
             --teacher's patch features (BEiT v2's semantic targets; the teacher: a stage of the chain)
    dall-e   a DALL-E-format encoder with random weights (pixel codes in OpenAI's layout, untrained:
             the control a random tokenizer gives), when asked for
    mae      no tokens: MAE's normalised pixels of the masked patches (configs/small_data_image_mae.yaml,
             the encoder over the visible quarter), when asked for
    T+agg    target T with BEiT v2's patch aggregation (--early_layers 3 --head_layers 2: the top
             [CLS] beside block 3's patches, of the tiny model's 4, as BEiT v2's 9 of 12), when asked for

    python experiments/targets_experiment.py --teacher outputs/demo_chain/3_image_text_itc_lambda_10000/checkpoint-7.pth
    python experiments/targets_experiment.py --teacher T --data_path ../shared/data/flickr8k_1k/images \\
        --labelled ../shared/data/hymenoptera --quick
    python experiments/targets_experiment.py --teacher PHOTO_TEACHER --data_path PHOTOS \\
        --labelled outputs/flickr_dog_person --steps transfer    # photos: no synthetic segmentation

Every step is a subprocess whose output is reused when found (rerun the command to continue).
Writes results.json and a table: per target, held-out MIM accuracy, pretraining time, fine-tuning
and linear-probe top-1 (mean ± std over --seeds) and segmentation mIoU on the synthetic world (over
--seg_seeds, one by default)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import UserError, cli_entry  # noqa: E402
from training.flag_checks import check_paths_exist  # noqa: E402
from experiments.experiment_runs import run_script  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENS = ("kmeans", "vqkd", "dall-e")
AGGREGATED = "+agg"
MAE = "mae"  # not tokens: MAE's normalised pixels, through configs/small_data_image_mae.yaml
TARGETS = (*TOKENS, *(t + AGGREGATED for t in TOKENS), MAE)
AGGREGATION_FLAGS = ["--early_layers", "3", "--head_layers", "2"]  # 3 of the tiny model's 4 blocks: BEiT v2's 9 of 12
QUICK = {"mim_epochs": 4, "vqkd_epochs": 2, "train_size": 400, "finetune_epochs": 4, "probe_epochs": 6,
         "seg_epochs": 2, "seg_scenes": (120, 60)}
FULL = {"mim_epochs": 50, "vqkd_epochs": 10, "train_size": 2000, "finetune_epochs": 30, "probe_epochs": 90,
        "seg_epochs": 16, "seg_scenes": (600, 200)}


def run(argv: list[str], log: Path, done: Path) -> float:
    """A step in its own process unless `done` exists; its seconds (0 when reused)."""
    return 0.0 if done.exists() else run_script(argv, log)["seconds"]


def tokenizer_flags(target: str, root: Path) -> list[str]:
    """The MIM stage's target flags (the tokenizer they name is made by `make_tokenizer`)."""
    if target == MAE:
        return []
    if target == "kmeans":
        return ["--d_vae_type", "kmeans", "--second_image_size", "32"]
    if target == "vqkd":
        return ["--d_vae_type", "vqkd", "--d_vae_weight_path", str(root / "vqkd.safetensors"), "--second_image_size", "64"]
    return ["--d_vae_type", "dall-e", "--d_vae_weight_path", str(root / "random_dall_e"), "--second_image_size", "64"]


def make_tokenizer(args, target: str, root: Path, size: dict) -> None:
    """The tokenizer `tokenizer_flags` names, unless it is there (k-means: the MIM stage fits its own)."""
    if target == "vqkd":
        path = root / "vqkd.safetensors"
        run([str(ROOT / "util/train_vqkd.py"), "--teacher", args.teacher, "--data_path", args.data_path, "--output",
             str(path), "--image_size", "64", "--patch_size", "8", "--epochs", str(size["vqkd_epochs"]),
             "--codebook_size", "128", "--synthetic_train_size", str(size["train_size"]), "--seed", str(args.seed),
             "--num_workers", str(args.num_workers)], root / "vqkd.output.txt", path)
    elif target == "dall-e" and not (root / "random_dall_e" / "encoder.safetensors").is_file():
        write_random_dall_e(root / "random_dall_e", args.seed)


def write_random_dall_e(folder: Path, seed: int) -> None:
    """A DALL-E encoder in OpenAI's layout (one token per 8 x 8 pixels), small and untrained."""
    import torch

    from models.visual_tokenizers.dall_e import DalleEncoder, DalleEncoderConfig
    from models.visual_tokenizers.dall_e_loader import save_dalle_part

    torch.manual_seed(seed)
    cfg = DalleEncoderConfig(n_hid=16, n_blk_per_group=1, vocab_size=128)
    folder.mkdir(parents=True, exist_ok=True)
    save_dalle_part(folder / "encoder.safetensors", DalleEncoder(cfg).state_dict(), cfg)


def folder(args, target: str) -> Path:
    """A target's folder: `kmeans+agg` in `kmeans_agg`."""
    return Path(args.output_dir) / target.replace(AGGREGATED, "_agg")


def synthetic_size(args, size: dict) -> list[str]:
    """The synthetic world's size, for a run on it (a run on photos is refused the flag)."""
    return ["--synthetic_train_size", str(size["train_size"])] if args.data_path == "synthetic" else []


def mim_argv(args, target: str, size: dict) -> list[str]:
    """The target's MIM stage (a checkpoint every 10 epochs and the last: an interrupted stage resumes)."""
    tokens = target.removesuffix(AGGREGATED)  # an aggregated row shares its plain row's tokenizer
    flags = tokenizer_flags(tokens, folder(args, tokens)) + (AGGREGATION_FLAGS if target.endswith(AGGREGATED) else [])
    epochs = size["mim_epochs"]
    config = "small_data_image_mae.yaml" if target == MAE else "small_data_image_mim.yaml"
    return ["--config", str(ROOT / "configs" / config), "--data_path", args.data_path,
            *synthetic_size(args, size), "--epochs", str(epochs), "--save_per_epochs", str(min(10, epochs)), "--seed",
            str(args.seed), "--num_workers", str(args.num_workers), "--no_pictures", "--output_dir",
            str(folder(args, target) / "mim"), "--auto_resume", *flags]


def check_every_stage(args, size: dict) -> None:
    """Every target's MIM stage, checked as it would be before it runs (its tokenizer may not exist yet)."""
    from training.cli import check_planned_pretrain_run

    for target in args.targets:
        root = folder(args, target.removesuffix(AGGREGATED))
        planned = frozenset({str(root / "vqkd.safetensors"), str(root / "random_dall_e")})
        try:
            check_planned_pretrain_run(mim_argv(args, target, size), planned)
        except UserError as err:
            raise UserError(f"the {target} MIM stage would be refused: {err}") from None


def pretrain(args, target: str, size: dict) -> tuple[Path, dict]:
    root = folder(args, target)
    tokens = target.removesuffix(AGGREGATED)
    make_tokenizer(args, tokens, folder(args, tokens), size)
    out = root / "mim"
    ckpt = out / f"checkpoint-{size['mim_epochs'] - 1}.pth"
    seconds = run([str(ROOT / "main_pretrain_cook.py"), *mim_argv(args, target, size)], root / "mim.output.txt", ckpt)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines() if line.strip()]
    aggregated = {"mim_acc_agg": log[-1]["test_acc_mim_agg"]} if "test_acc_mim_agg" in log[-1] else {}
    mae = {"mae_loss": log[-1]["test_loss_mae"]} if "test_loss_mae" in log[-1] else {}
    return ckpt, {"mim_acc": log[-1].get("test_acc_mim"), **aggregated, **mae, "pretrain_seconds": seconds or None}


def summary_for(out: Path, seeds: list[int]) -> Path:
    """`out/results.json`, set aside first when it summarises another number of seeds: asked for more
    seeds, the step runs again (its finished per-seed runs are reused), instead of the old summary
    being taken for the new one."""
    done = out / "results.json"
    if done.exists() and (old := len(json.loads(done.read_text()).get("pretrained", []))) != len(seeds):
        done.rename(out / f"results.{old}-seeds.json")
    return done


def transfer(args, target: str, ckpt: Path, size: dict, with_random_init: bool) -> dict:
    out = folder(args, target) / "transfer"
    run([str(ROOT / "experiments/transfer_experiment.py"), "--pretrained", str(ckpt), "--data_path", args.labelled,
         "--output_dir", str(out), "--seeds", *map(str, args.seeds), "--finetune_epochs", str(size["finetune_epochs"]),
         "--probe_epochs", str(size["probe_epochs"]), "--num_workers", str(args.num_workers),
         *([] if with_random_init else ["--skip_random_init"])], out.with_suffix(".output.txt"),
        summary_for(out, args.seeds))
    return json.loads((out / "results.json").read_text())


def segmentation(args, target: str, ckpt: Path, size: dict, with_random_init: bool) -> dict:
    out = folder(args, target) / "segmentation"
    scenes = size["seg_scenes"]
    run([str(ROOT / "experiments/segmentation_experiment.py"), "--pretrained", str(ckpt), "--output_dir", str(out), "--seeds",
         *map(str, args.seg_seeds), "--epochs", str(size["seg_epochs"]), "--train_scenes", str(scenes[0]), "--val_scenes",
         str(scenes[1]), "--num_workers", str(args.num_workers), *([] if with_random_init else ["--skip_random_init"])],
        out.with_suffix(".output.txt"), summary_for(out, args.seg_seeds))
    return json.loads((out / "results.json").read_text())


STEPS = {"transfer": transfer, "segmentation": segmentation}


def _sized(value):
    return tuple(value) if isinstance(value, list) else value


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def table(results: dict) -> str:
    rows = ["| targets | held-out MIM acc (MAE: loss) | fine-tune top-1 | linear probe top-1 | segmentation mIoU |",
            "| --- | --- | --- | --- | --- |"]
    for target, r in results.items():
        held_out = f"{r['mim_acc']:.3f}" if r.get("mim_acc") is not None else f"{r.get('mae_loss', float('nan')):.3f}"
        rows.append(f"| {target} | {held_out} | {cells(r, 'pretrained')} |")
    first = next(iter(results.values()))
    if "random init" in first.get("transfer", first.get("segmentation", {})):  # run with the first target only
        rows.append(f"| random init | | {cells(first, 'random init')} |")
    return "\n".join(rows)


def cells(result: dict, row: str) -> str:
    """Fine-tune, probe and mIoU cells of one row; blank for a step not run (--steps)."""
    transfer, seg = result.get("transfer", {}).get(row), result.get("segmentation", {}).get(row)
    columns = ["", ""] if transfer is None else [spread([x["finetune"] for x in transfer]),
                                                 spread([x["probe"] for x in transfer])]
    columns.append("" if seg is None else spread([x["best_mIoU"] for x in seg]))
    return " | ".join(columns)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="the VQ-KD teacher: a checkpoint of any stage (needed by the vqkd targets)")
    p.add_argument("--data_path", default="synthetic", help="unlabelled pretraining images (default: synthetic)")
    p.add_argument("--labelled", default="synthetic", help="the transfer experiment's labelled folder (default: "
                                                            "the synthetic world's)")
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=["kmeans", "vqkd"])
    p.add_argument("--steps", nargs="+", choices=("transfer", "segmentation"), default=["transfer", "segmentation"],
                   help="downstream experiments after pretraining (segmentation is on the synthetic world's scenes "
                        "whatever --data_path is; default: both)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the transfer runs")
    p.add_argument("--seg_seeds", nargs="+", type=int, default=[0], help="seeds of the segmentation runs (4-5 min "
                   "each on 2 idle CPU cores; default: %(default)s, the segmentation experiment's own default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pretraining and tokenizers")
    p.add_argument("--quick", action="store_true", help="a small run of every step (smoke test)")
    for key, value in FULL.items():  # each size on its own, to fit a run to one's machine
        p.add_argument(f"--{key}", type=int, nargs=len(value) if isinstance(value, tuple) else None, default=None,
                       help=f"(default: {value}; --quick: {QUICK[key]})")
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--output_dir", default=None, help="default: outputs/targets_experiment[_quick]")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.teacher is None and any(t.removesuffix(AGGREGATED) == "vqkd" for t in args.targets):
        raise UserError("--targets vqkd trains a VQ-KD tokenizer to reconstruct a teacher's features: pass --teacher "
                        "CHECKPOINT (a stage of the chain, e.g. the image-text stage), or leave out vqkd")
    check_paths_exist({"teacher": args.teacher, "data_path": None if args.data_path == "synthetic" else args.data_path,
                       "labelled": None if args.labelled == "synthetic" else args.labelled})
    size = {key: value if getattr(args, key) is None else _sized(getattr(args, key))
            for key, value in (QUICK if args.quick else FULL).items()}
    args.output_dir = args.output_dir or f"outputs/targets_experiment{'_quick' if args.quick else ''}"
    check_every_stage(args, size)
    # In phases, cheapest answers first: every target's pretraining, then every transfer, then every
    # segmentation (the longest step); the random-init rows once, with the first target.
    pretrained = {target: pretrain(args, target, size) for target in args.targets}
    results = {target: dict(pre) for target, (_, pre) in pretrained.items()}
    for step in (STEPS[name] for name in args.steps):
        for i, (target, (ckpt, _)) in enumerate(pretrained.items()):
            results[target][step.__name__] = step(args, target, ckpt, size, with_random_init=i == 0)
            print(f"{target}: {step.__name__} done", flush=True)
    text = table(results)
    print(text)
    out = Path(args.output_dir)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(text + "\n")
    (out / "sizes.json").write_text(json.dumps(size))  # the budget every row had
    return results


if __name__ == "__main__":
    main()
