"""Which way of not forgetting works, at what cost: every continual-learning method over the same
chain (image MIM → text MLM → image-text ITC), for several seeds, scored on the accuracy matrix.

    python experiments/continual_benchmark.py --quick                       # every method, one seed, ~15 min on 2 CPU cores
    python experiments/continual_benchmark.py --methods self_reg lora l2 --seeds 0 1 2 --lambdas l2=30
    python experiments/continual_benchmark.py --quick --image_objective mae  # the image stage with MAE's objective
    python experiments/continual_benchmark.py --preset resolved --seeds 0 1 2  # where every stage learns: the docs' table

Per seed: a reference model (random init), one image MIM stage shared by all methods (it writes
its Fisher information for ewc), then for each method its text and image-text stages. After
every stage (and for the reference) one evaluation measures every probe the chain has data for
(MIM accuracy and loss, k-NN, MLM accuracy, retrieval R@1/5/10), with the heads a stage has not
trained yet freshly initialised as that stage would start them. Finished stages and rows found in
--output_dir are reused. Writes results.json (per method: acc, bwt, fwt, forgetting, the last
stage's score, costs; mean and std over seeds; the matrices), table.md and chart.png.
Definitions: experiments/cl_metrics.py and docs/continual.md."""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.cl_metrics import mim_gain, summary  # noqa: E402
from common.errors import UserError, cli_entry  # noqa: E402
from custom_datasets.pair_data import caption_texts  # noqa: E402
from models.text_tokenizer import train_wordpiece  # noqa: E402
from training.continual import CL_METHODS  # noqa: E402
from training.flag_checks import check_paths_exist  # noqa: E402
from experiments.experiment_runs import run_script  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# the chain's stages in each order: the first trains fully from the reference and is shared by every
# method; the others are each method's
ORDERS = {"image-first": ("image_mim", "text_mlm", "image_text_itc"),
          "text-first": ("text_mlm", "image_mim", "image_text_itc")}
IMAGE_STAGES = {"mim": "image_mim", "mae": "image_mae"}  # --image_objective: the image stage's mode
KIND = {"image_mim": "image", "image_mae": "image", "text_mlm": "text", "image_text_itc": "pair"}
LABEL = {"image_mim": "image MIM", "image_mae": "image MAE", "text_mlm": "text MLM", "image_text_itc": "image-text"}
PROBES = {"image_mim": ("image_mim_acc", "image_mim_loss", "image_mim_gain", "image_knn_acc"),
          "image_mae": ("image_mae_r2", "image_mae_loss", "image_knn_acc"),
          "text_mlm": ("text_mlm_acc",),
          "image_text_itc": ("itc_i2t_r1", "itc_i2t_r5", "itc_i2t_r10", "itc_t2i_r1", "itc_t2i_r5", "itc_t2i_r10")}


def chain(order: str, image_objective: str = "mim") -> tuple[str, ...]:
    """The stages' modes in `order`, the image stage trained with `image_objective`."""
    return tuple(IMAGE_STAGES[image_objective] if exp == "image_mim" else exp for exp in ORDERS[order])


def owner_for(order: str, image_objective: str = "mim") -> dict[str, int]:
    """Each probe's stage (1-based) in `order`."""
    return {probe: i + 1 for i, exp in enumerate(chain(order, image_objective)) for probe in PROBES[exp]}


OWNER = owner_for("image-first")
VISUAL_VOCAB = 128  # k-means tokens of the image stage
DEFAULT_LAMBDAS = {"self_reg": 1e4, "self_reg+replay": 1e4, "l2": 30.0, "ewc": 1e6, "distill": 10.0}
SIZES = {  # (train images, held-out, MIM epochs, MLM epochs, ITC epochs)
    "default": (2000, 300, 10, 6, 8),
    "quick": (600, 200, 4, 3, 6),
    "resolved": (600, 200, 4, 3, 12),
}
# The image-text stage's base learning rate per preset. At 2e-2 the adapter methods' contrastive loss
# falls to ln(batch) within two epochs (every caption equally likely: collapse) and stays there; at 5e-3
# with 12 epochs plain LoRA's held-out in-batch t2i accuracy climbs from 0.035 to 0.15 (measured, seed 0).
PAIR_BLR = {"default": "2e-2", "quick": "2e-2", "resolved": "5e-3"}
JOINT = "joint"  # not a per-stage method: all the later stages' objectives at once, the upper bound
HEADLINE = {"acc": "ACC", "bwt": "BWT", "fwt": "FWT", "forgetting": "forgetting", "new_task": "last stage"}


def run_child(argv: list[str], log: Path) -> dict[str, float]:
    """One stage or evaluation of main_pretrain_cook.py in its own process; output to `log`."""
    cost = run_script([str(ROOT / "main_pretrain_cook.py"), *argv], log)
    return {"seconds": cost["seconds"], "peak_rss_mb": cost["peak_rss_mb"]}


def common_flags(args: argparse.Namespace, seed: int, tokenizer: Path) -> list[str]:
    return ["--model", "vlmo_tiny_patch16", "--image_size", "64", "--patch_size", "8", "--drop_path", "0",
            "--batch_size", "64", "--num_workers", str(args.num_workers), "--print_freq", "1000",
            "--tokenizer", str(tokenizer), "--seed", str(seed), "--save_per_epochs", "1000", "--no_pictures"]


IMAGE_VIEWS = ["--min_crop_scale", "0.5"]  # what the modes that read images add
# the MAE stage's decoder: the small-data config's (configs/small_data_image_mae.yaml), at its learning rate
MAE_FLAGS = ["--decoder_embed_dim", "192", "--decoder_depth", "2", "--decoder_num_heads", "6"]


def token_flags(files: "SeedFiles | None") -> list[str]:
    """What the modes that predict visual tokens add: the tokenizer's view and, once it is fitted,
    the chain's k-means tokenizer (the MIM targets of every later stage and row)."""
    fitted = ["--d_vae_weight_path", str(files.visual_tokenizer)] if files is not None else []
    return IMAGE_VIEWS + ["--second_image_size", "32"] + fitted


def data_flags(args: argparse.Namespace, kind: str) -> list[str]:
    """What a stage of data kind `kind` ("image", "text", "pair") reads; the evaluation rows read
    the pairs, whose held-out split every probe is measured on."""
    if not args.real:
        train, val = args.sizes[:2]
        return ["--data_path", "synthetic", "--synthetic_train_size", str(train), "--synthetic_val_size", str(val),
                "--synthetic_render_size", "64"]
    split = ["--val_fraction", str(REAL_HELD_OUT)]
    return split + {"image": ["--data_path", args.images], "text": ["--data_file_path", str(args.text_file)],
                    "pair": ["--data_path", args.pair_images, "--data_file_path", args.pairs]}[kind]


REAL_DATA = ("images", "captions", "pairs", "pair_images")
# Held out of real data, by file name: the pairs' images and the image stage's are the same split,
# so no row measures an image the image stage trained on; a fifth of the 1k Flickr8k pairs is 200 images, 1,000 captions.
REAL_HELD_OUT = 0.2


def check_real_data(args: argparse.Namespace) -> bool:
    """True when the chain reads real data (all four flags), False for the synthetic world."""
    given = [name for name in REAL_DATA if getattr(args, name)]
    if given and len(given) < len(REAL_DATA):
        missing = [f"--{n}" for n in REAL_DATA if n not in given]
        raise UserError(f"a chain on real data needs {' '.join(missing)} too (images for MIM, captions for MLM, pairs "
                        f"and their image folder for ITC and for every evaluation)")
    check_paths_exist({name: getattr(args, name) for name in given})
    return bool(given)


def text_without_pair_captions(captions: list[str], pairs: str, out: Path) -> Path:
    """The text stage's captions less every caption of the pairs, so that the MLM probe on the
    held-out pairs' captions measures text never trained on."""
    from custom_datasets.text_data import CaptionCorpus

    path = out / "text_stage_captions.json"
    if path.is_file():  # written by an earlier run of this benchmark (its stages were trained on it)
        return path
    held = set(CaptionCorpus([pairs]).texts())
    kept = [{"caption": c} for c in CaptionCorpus(captions).texts() if c not in held]
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept))
    print(f"text stage: {len(kept)} captions ({path}), none of them a caption of the pairs")
    return path


def write_reference(flags: list[str], path: Path) -> None:
    """The chain's input: the backbone a from-scratch stage with these flags would build, as a file
    that records every weight group as untrained."""
    import torch

    from common.checkpoint_io import save_weights
    from models.pretrained import UNTRAINED, weight_groups
    from training.cli import pretrain_config_from_argv
    from training.tokenizers import build_text_tokenizer
    from training.weights import Weights, build_backbone

    cfg = pretrain_config_from_argv(flags + ["--exp_name", "image_mim", "--output_dir", str(path.parent / "unused")])
    tokenizer, cfg = build_text_tokenizer(cfg)
    torch.manual_seed(cfg.run.seed)
    backbone = build_backbone(cfg, Weights(), len(tokenizer))
    tensors = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    save_weights(path, tensors, backbone.cfg.to_dict(), info={UNTRAINED: sorted(weight_groups(tensors))})


def evaluate_row(flags: list[str], weights: Path, out: Path, image_objective: str = "mim") -> dict[str, float]:
    """Every probe of the chain on `weights` (compound_pretrain's evaluation holds all the heads, an
    MAE stage's decoder carried with them); `flags` name the held-out pairs and the visual tokenizer."""
    report = out / "eval_report.json"
    if not report.is_file():
        run_child(eval_argv(flags, weights, out), out / "output.txt")
    row = json.loads(report.read_text())
    if image_objective == "mae":  # compound_pretrain's own MIM head, never trained in an MAE chain
        return {k: v for k, v in row.items() if not k.startswith("image_mim_")}
    return with_mim_gain(row)


def with_mim_gain(row: dict[str, float]) -> dict[str, float]:
    """The row with the MIM loss also as a score (experiments.cl_metrics.mim_gain; 128 visual tokens)."""
    if "image_mim_loss" in row:
        row["image_mim_gain"] = mim_gain(row["image_mim_loss"], VISUAL_VOCAB)
    return row


def run_stage(flags: list[str], out: Path) -> dict[str, float]:
    """A stage (reused when its report exists); returns its cost."""
    cost_file = out / "cost.json"
    if (out / "stage_report.json").is_file() and cost_file.is_file():
        return json.loads(cost_file.read_text())
    cost = run_child(flags + ["--output_dir", str(out)], out.parent / f"{out.name}.output.txt")
    trainable = trainable_parameters(out)
    cost.update(trainable_parameters=trainable, stored_parameters=stored_parameters(out, trainable))
    cost_file.write_text(json.dumps(cost, indent=1))
    return cost


def trainable_parameters(out: Path) -> int:
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines() if line.strip()]
    return int(lines[-1]["n_parameters"])


def stored_parameters(out: Path, trainable: int) -> int:
    """What a stage adds to keep: its adapters, or (full training) the whole model."""
    from safetensors import safe_open

    adapters = out / "adapters.safetensors"
    if adapters.is_file():
        with safe_open(str(adapters), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return trainable


@dataclass(frozen=True)
class Variant:
    """One line of the comparison: a method with one value of its knob (λ, α or the replay share)."""

    name: str  # as the tables and pictures show it
    method: str
    knob: str  # the knob in words ("" without one)
    flags: tuple[str, ...]  # the stage flags that set it
    folder: str  # named after the knob, so a finished stage is only reused for the same value


def variants(args: argparse.Namespace) -> list[Variant]:
    return [scoped for variant in knob_variants(args) for scoped in scope_variants(args, variant)]


def scope_variants(args: argparse.Namespace, variant: Variant) -> list[Variant]:
    """A self-regularizing method once per --self_reg_scopes: its penalty on the adapters alone
    (ContinualTransformer's, the folder as before) or on every weight an earlier stage trained."""
    if variant.method not in CL_METHODS or "self_reg_scope" not in CL_METHODS[variant.method].reads:
        return [variant]
    out = []
    for scope in args.self_reg_scopes:
        if scope == "adapters":
            out.append(variant)
            continue
        name = variant.name.replace(variant.method, f"{variant.method} ({scope})", 1)
        out.append(Variant(name, variant.method, " ".join(filter(None, [variant.knob, f"scope {scope}"])),
                           (*variant.flags, "--self_reg_scope", scope),
                           variant.folder.replace(variant.method, f"{variant.method}_{scope}", 1)))
    return out


def knob_variants(args: argparse.Namespace) -> list[Variant]:
    out = []
    for method in args.methods:
        knobs = {**{m: ("reg_loss_weight", "λ", "lambda", values) for m, values in args.lambdas.items()},
                 "wise": ("wise_alpha", "α", "alpha", args.wise_alpha),
                 "replay": ("replay_ratio", "ρ", "ratio", args.replay_ratio)}.get(method)  # self_reg+replay: its λ
        if knobs is None:
            out.append(Variant(method, method, "", (), method))
            continue
        flag, symbol, word, values = knobs
        for value in values:
            name = method if len(values) == 1 else f"{method} {symbol}={value:g}"
            out.append(Variant(name, method, f"{symbol} {value:g}", (f"--{flag}", f"{value:g}"),
                               f"{method}_{word}_{value:g}"))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise UserError("--methods names a method twice, or --lambdas gives one value twice")
    return out


def method_flags(args: argparse.Namespace, variant: Variant) -> list[str]:
    flags = ["--cl_method", variant.method, *variant.flags]
    if variant.method != "full":
        flags += ["--lora_rank", str(args.lora_rank), "--save_merged_lora_model"]
    if variant.method == "ewc":
        flags += ["--fisher_samples", str(args.fisher_samples)]  # for the ITC stage's ewc
    return flags


def handover(stage_dir: Path, epochs: int, variant_method: str) -> Path:
    """What the next stage starts from: the merged adapters, or a full run's last checkpoint."""
    if variant_method == "full":
        return stage_dir / f"checkpoint-{epochs - 1}.pth"
    return stage_dir / "merged_model.safetensors"


def stage_epochs(args: argparse.Namespace, exp: str) -> int:
    return {"image": args.sizes[2], "text": args.sizes[3], "pair": args.sizes[4]}[KIND[exp]]


def image_flags(exp: str, files: "SeedFiles | None") -> list[str]:
    """What an image stage adds: MIM its visual tokens (`files` None: the stage fits them), MAE its decoder."""
    if exp == "image_mae":
        return IMAGE_VIEWS + MAE_FLAGS
    return token_flags(files) + ["--visual_vocab_size", str(VISUAL_VOCAB)]


def first_argv(args: argparse.Namespace, flags: list[str], files: "SeedFiles") -> list[str]:
    """The shared first stage: the whole backbone trained from the reference (it writes the Fisher
    information ewc needs next). An image stage first fits the chain's visual tokenizer itself."""
    exp = args.chain[0]
    extra = image_flags(exp, None) if KIND[exp] == "image" else []
    if args.real and exp == "text_mlm":
        extra += ["--max_val_samples", "1000"]
    return flags + extra + data_flags(args, KIND[exp]) + ["--exp_name", exp, "--epochs", str(stage_epochs(args, exp)),
                                                          "--init_from", str(files.reference),
                                                          "--fisher_samples", str(args.fisher_samples)]


def stage_argv(args: argparse.Namespace, flags: list[str], variant: Variant, exp: str, start: Path,
               files: "SeedFiles") -> list[str]:
    """A later stage of `variant`, starting from `start`: through the method's adapters or penalty."""
    blr = {"text": "5e-3", "image": "5e-3", "pair": PAIR_BLR[args.preset]}[KIND[exp]]  # image: as the text stage
    extra = ["--batch_size", "32", *IMAGE_VIEWS] if exp == "image_text_itc" else []  # more steps, as demo_chain.py
    if KIND[exp] == "image":
        extra = image_flags(exp, files)
    if args.real and exp == "text_mlm":  # the stage's own per-epoch check (the rows are measured apart)
        extra += ["--max_val_samples", "1000"]
    return flags + data_flags(args, KIND[exp]) + method_flags(args, variant) + extra + [
        "--exp_name", exp, "--epochs", str(stage_epochs(args, exp)), "--blr", blr, "--init_from", str(start)]


def joint_argv(args: argparse.Namespace, flags: list[str], files: "SeedFiles") -> list[str]:
    epochs = sum(stage_epochs(args, exp) for exp in args.chain[1:])
    return flags + token_flags(files) + data_flags(args, "pair") + ["--lora_rank", str(args.lora_rank), "--save_merged_lora_model",
                                               "--exp_name", "compound_pretrain", "--epochs", str(epochs),
                                               "--blr", "1e-2", "--batch_size", "32", "--init_from", str(files.first_ckpt)]


def eval_argv(evaluation: list[str], weights: Path, out: Path) -> list[str]:
    return evaluation + ["--exp_name", "compound_pretrain", "--eval", "--init_from", str(weights), "--output_dir",
                         str(out)]


@dataclass(frozen=True)
class SeedFiles:
    """What a seed's chain writes, by the step that writes it."""

    root: Path
    tokenizer: Path  # the text tokenizer
    reference: Path
    first: Path  # the shared first stage's folder
    first_ckpt: Path
    visual_tokenizer: Path  # the MIM targets: fitted by an image stage that comes first, else up front

    @classmethod
    def of(cls, args: argparse.Namespace, seed: int) -> "SeedFiles":
        root = Path(args.output_dir) / f"seed_{seed}"
        exp = args.chain[0]
        first = root / f"1_{exp}"
        visual = (first if exp == "image_mim" else root) / "visual_tokenizer.safetensors"
        return cls(root, root / "text_tokenizer", root / "0_reference" / "random_init.safetensors", first,
                   first / f"checkpoint-{stage_epochs(args, exp) - 1}.pth", visual)


def seed_flags(args: argparse.Namespace, seed: int, files: SeedFiles) -> tuple[list[str], list[str]]:
    """(the flags of every later stage, those of every evaluation row: compound_pretrain's, with the
    image stage's visual tokenizer)."""
    flags = common_flags(args, seed, files.tokenizer)
    return flags, flags + token_flags(files) + data_flags(args, "pair")


def check_every_run(args: argparse.Namespace) -> None:
    """Every child command of the benchmark, checked as its run would check it, before the first
    one starts: a bad knob (--wise_alpha 2, --replay_ratio 1) is refused now, not after the
    reference and the image stage have run for minutes."""
    from training.cli import check_planned_pretrain_run

    files = SeedFiles.of(args, args.seeds[0])
    flags, evaluation = seed_flags(args, args.seeds[0], files)
    runs = [(f"the first stage ({args.chain[0]})", first_argv(args, flags, files)),
            ("an evaluation row", eval_argv(evaluation, files.first_ckpt, files.first / "row"))]
    made = {files.tokenizer, files.reference, files.first_ckpt, files.visual_tokenizer}
    for variant in variants(args):
        if variant.method == JOINT:
            runs.append((f"{JOINT}'s compound stage", joint_argv(args, flags, files)))
            continue
        start = files.first_ckpt
        for exp, folder in later_stages(args):
            runs.append((f"{variant.name}'s {exp} stage", stage_argv(args, flags, variant, exp, start, files)))
            start = handover(files.root / variant.folder / folder, stage_epochs(args, exp), variant.method)
            made.add(start)
    planned = frozenset(str(p) for p in made)
    for label, argv in runs:
        try:
            check_planned_pretrain_run(argv, planned)
        except UserError as err:
            raise UserError(f"{label} would be refused: {err}") from None


def later_stages(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(mode, folder) of each method's own stages, in the chain's order."""
    return [(exp, f"{i}_{exp}") for i, exp in enumerate(args.chain[1:], start=2)]


def fit_chain_tokenizer(args: argparse.Namespace, files: SeedFiles, seed: int) -> None:
    """A chain whose MIM stage is not first fits its k-means tokenizer before anything, on the
    image stage's training data, so that every row, the reference's too, measures MIM on it (an MAE
    chain too: the evaluation rows are compound_pretrain's, which reads visual tokens)."""
    if files.visual_tokenizer.is_file() or args.chain[0] == "image_mim":
        return
    data = ["--data_path", args.images] if args.real else ["--data_path", "synthetic"]
    run_script([str(ROOT / "util/fit_visual_tokenizer.py"), *data, "--output", str(files.visual_tokenizer),
                "--image_size", "64", "--patch_size", "8", "--second_image_size", "32", "--vocab_size",
                str(VISUAL_VOCAB), "--seed", str(seed), "--num_workers", str(args.num_workers)],
               files.root / "visual_tokenizer.output.txt")


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, dict]:
    """{method: {"matrix", "summary", "cost"}} for one seed."""
    train = args.sizes[0]
    files = SeedFiles.of(args, seed)
    if not (files.tokenizer / "vocab.txt").is_file():
        sources = [str(args.text_file), args.pairs] if args.real else ["synthetic"]
        train_wordpiece(caption_texts(sources, train, seed), 512 if not args.real else 4000, files.tokenizer)
    flags, evaluation = seed_flags(args, seed, files)
    if not files.reference.is_file():
        files.reference.parent.mkdir(parents=True, exist_ok=True)
        write_reference(flags + token_flags(None) + data_flags(args, "image"), files.reference)
    fit_chain_tokenizer(args, files, seed)
    first_cost = run_stage(first_argv(args, flags, files), files.first)
    print(f"seed {seed}: reference and {LABEL[args.chain[0]]} rows", flush=True)
    rows0 = [evaluate_row(evaluation, files.reference, files.reference.parent / "row", args.image_objective),
             evaluate_row(evaluation, files.first_ckpt, files.first / "row", args.image_objective)]
    owner = owner_for(args.order, args.image_objective)
    results = {}
    for variant in variants(args):
        if variant.method == JOINT:
            results[variant.name] = run_joint(args, seed, flags, evaluation, files, rows0, first_cost)
            continue
        start, rows, costs = files.first_ckpt, list(rows0), [first_cost]
        for exp, name in later_stages(args):
            print(f"seed {seed}: {variant.name} {exp}", flush=True)
            folder = files.root / variant.folder / name
            costs.append(run_stage(stage_argv(args, flags, variant, exp, start, files), folder))
            start = handover(folder, stage_epochs(args, exp), variant.method)
            rows.append(evaluate_row(evaluation, start, folder / "row", args.image_objective))
        results[variant.name] = {"matrix": rows, "summary": summary(rows, owner), "cost": costs, "knob": variant.knob}
        (files.root / variant.folder / "matrix.json").write_text(json.dumps(results[variant.name], indent=1))
    return results


def run_joint(args: argparse.Namespace, seed: int, flags: list[str], evaluation: list[str], files: SeedFiles,
              rows0: list[dict], first_cost: dict) -> dict:
    """The upper bound: after the shared first stage, one compound stage that trains MIM, MLM and
    ITC together on the pairs, for as many epochs as the two later stages together, with the same
    adapters. It has no row between the second and third stages (left empty)."""
    stage = files.root / JOINT / "2_compound"
    print(f"seed {seed}: joint compound_pretrain", flush=True)
    cost = run_stage(joint_argv(args, flags, files), stage)
    epochs = sum(stage_epochs(args, exp) for exp in args.chain[1:])
    rows = [*rows0, {}, evaluate_row(evaluation, handover(stage, epochs, JOINT), stage / "row", args.image_objective)]
    result = {"matrix": rows, "summary": summary(rows, owner_for(args.order, args.image_objective)), "cost": [first_cost, cost]}
    (files.root / JOINT / "matrix.json").write_text(json.dumps(result, indent=1))
    return result


def spread(values: list[float | None]) -> dict[str, float | None]:
    kept = [v for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None}
    return {"mean": statistics.mean(kept), "std": statistics.stdev(kept) if len(kept) > 1 else 0.0}


def aggregate(per_seed: dict[int, dict[str, dict]], owner: dict[str, int] = OWNER) -> dict[str, dict]:
    out = {}
    for method in next(iter(per_seed.values())):
        runs = [per_seed[s][method] for s in per_seed]
        entry = {key: spread([r["summary"][key] for r in runs]) for key in ("acc", "bwt", "fwt", "forgetting")}
        entry["new_task"] = spread([r["summary"]["task_scores"][-1][-1] for r in runs])
        entry["last_stage"] = entry["new_task"]
        entry["last_stage_chance"] = retrieval_chance(runs[0]["matrix"][-1])
        entry["probes_final"] = {p: spread([r["matrix"][-1].get(p) for r in runs]) for p in owner}
        entry["probes_kept"] = {p: spread([r["summary"]["probes"].get(p, {}).get("kept") for r in runs]) for p in owner}
        entry["cost"] = {key: spread([sum(c[key] for c in r["cost"][1:]) for r in runs])
                         for key in ("seconds", "trainable_parameters", "stored_parameters")}
        entry["cost"]["peak_rss_mb"] = spread([max(c["peak_rss_mb"] for c in r["cost"][1:]) for r in runs])
        entry["matrices"] = {str(s): per_seed[s][method]["matrix"] for s in per_seed}
        entry["task_scores"] = [r["summary"]["task_scores"] for r in runs]
        entry["knob"] = runs[0].get("knob", "")
        out[method] = entry
    return out


RECALLS = (1, 5, 10)


def retrieval_chance(row: dict[str, float]) -> float | None:
    """The image-text task score of a model that ranks at random: R@k = k / images in both directions
    (a caption's image among the images; an image's captions, its share of all captions, among the
    captions), averaged over k as the task score averages."""
    images = row.get("itc_images")
    return sum(min(k, images) / images for k in RECALLS) / len(RECALLS) if images else None


def _cell(stat: dict[str, float | None], digits: int = 3) -> str:
    if stat["mean"] is None:
        return ""
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" if stat["std"] else f"{stat['mean']:.{digits}f}"


# the image stage's columns: its loss at the end of the chain and the share of its score kept
IMAGE_COLUMNS = {"image_mim_loss": ("MIM loss (final)", "image_mim_gain", "MIM gain kept"),
                 "image_mae_loss": ("MAE loss (final)", "image_mae_r2", "MAE r² kept")}


def table(results: dict[str, dict]) -> str:
    loss = next(k for k in IMAGE_COLUMNS if k in next(iter(results.values()))["probes_final"])
    loss_label, score, score_label = IMAGE_COLUMNS[loss]
    head = ["method", "knob", *HEADLINE.values(), loss_label, score_label, "k-NN (final)", "MLM (final)",
            "t2i R@5 (final)", "trainable (later stages)", "stored", "s (later stages)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method, r in results.items():
        cells = [method, r["knob"], *(_cell(r[k]) for k in HEADLINE),
                 _cell(r["probes_final"][loss]), _cell(r["probes_kept"][score], 2),
                 *(_cell(r["probes_final"][p]) for p in ("image_knn_acc", "text_mlm_acc", "itc_t2i_r5")),
                 f"{r['cost']['trainable_parameters']['mean'] / 1e6:.2f}M", f"{r['cost']['stored_parameters']['mean'] / 1e6:.2f}M",
                 f"{r['cost']['seconds']['mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_chart(results: dict[str, dict], seed: str, out: Path, stages: tuple[str, ...] = ORDERS["image-first"]) -> Path:
    """Each probe across the chain (reference, then each stage), one line per method (one seed), as
    a PNG and as TensorBoard scalars `continual/<probe>/<method>` with the stage as step."""
    from torch.utils.tensorboard import SummaryWriter

    from visualization.canvas import save_picture
    from experiments.stage_chart import stage_chart

    probes = {"image_mim_loss": "image MIM loss", "image_mae_loss": "image MAE loss", "image_knn_acc": "image k-NN accuracy", "text_mlm_acc": "text MLM "
              "accuracy", "itc_t2i_r5": "text-to-image R@5"}
    runs = {m: r["matrices"][seed] for m, r in results.items()}
    writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=0)
    for method, rows in runs.items():
        for step, row in enumerate(rows):
            for key in probes:
                if key in row:
                    writer.add_scalar(f"continual/{key}/{method}", row[key], step)
    path = save_picture(stage_chart(["reference", *(LABEL[exp] for exp in stages)], runs, probes),
                        out / "chart.png", writer, "continual/chart")
    writer.close()
    return path


def write_tradeoff(results: dict[str, dict], out: Path) -> Path:
    """The stability–plasticity picture: the last stage's score against the mean final score of the
    earlier stages, one point per method (mean ± std over seeds)."""
    from visualization.canvas import save_picture
    from experiments.stability_plasticity import stability_plasticity

    points = {}
    for method, r in results.items():
        kept = [statistics.mean(s[-1][:-1]) for s in r["task_scores"] if all(v is not None for v in s[-1][:-1])]
        new = [s[-1][-1] for s in r["task_scores"]]
        if kept and new:
            points[method] = (*_mean_std(new), *_mean_std(kept))
    picture = stability_plasticity(points, "learned by the last stage (image-text task score)",
                                   "kept of the earlier stages (mean final image and text task score)")
    return save_picture(picture, out / "stability_plasticity.png")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def parse_lambdas(items: list[str]) -> dict[str, list[float]]:
    """`METHOD=V1,V2` items over the defaults (one value each)."""
    lambdas = {k: [v] for k, v in DEFAULT_LAMBDAS.items()}
    for item in items:
        name, _, values = item.partition("=")
        if name not in DEFAULT_LAMBDAS or not values:
            raise UserError(f"--lambdas {item}: write METHOD=VALUE[,VALUE...] with METHOD one of {', '.join(DEFAULT_LAMBDAS)}")
        try:
            lambdas[name] = [float(v) for v in values.split(",")]
        except ValueError:
            raise UserError(f"--lambdas {item}: {values} is not a list of numbers") from None
    return lambdas


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=[*CL_METHODS, JOINT], choices=[*CL_METHODS, JOINT],
                   help="methods to compare (default: all registered, and joint)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of data, masks and init (default: 0)")
    p.add_argument("--lambdas", nargs="*", default=[], metavar="METHOD=λ",
                   help="penalty weights, several per method for a sweep (METHOD=V1,V2,...; default: "
                   + " ".join(f"{k}={v:g}" for k, v in DEFAULT_LAMBDAS.items()) + ")")
    p.add_argument("--wise_alpha", type=float, nargs="+", default=[0.5], help="α of wise; several make a sweep "
                   "(default: 0.5)")
    p.add_argument("--replay_ratio", type=float, nargs="+", default=[0.25], help="share of replayed samples; several "
                   "make a sweep (default: 0.25)")
    p.add_argument("--self_reg_scopes", nargs="+", choices=("adapters", "all"), default=["adapters", "all"],
                   help="what self-regularization's penalty covers, one variant each: the adapters (ContinualTransformer's) "
                        "or every weight an earlier stage trained (default: both)")
    p.add_argument("--lora_rank", type=int, default=16, help="LoRA rank of every method but full (default: %(default)s)")
    p.add_argument("--fisher_samples", type=int, default=512, help="samples of each Fisher estimate (default: %(default)s)")
    p.add_argument("--images", help="real data: the image MIM stage's image folder (with --captions, --pairs, "
                   "--pair_images; default: the embedded synthetic world)")
    p.add_argument("--captions", nargs="+", help="real data: the text MLM stage's caption files (captions that are "
                   "also captions of --pairs are left out)")
    p.add_argument("--pairs", help="real data: the image-text pairs (a caption file naming images), for the ITC stage "
                   "and, through their held-out split, for every evaluation")
    p.add_argument("--pair_images", help="real data: the folder the pairs' image names are relative to")
    p.add_argument("--order", choices=tuple(ORDERS), default="image-first",
                   help="image-first: image MIM (shared) -> text MLM -> image-text; text-first: text MLM (shared) -> "
                        "image MIM -> image-text, the image stage through each method's adapters or penalty "
                        "(default: %(default)s)")
    p.add_argument("--image_objective", choices=tuple(IMAGE_STAGES), default="mim",
                   help="the image stage's objective: mim (BEiT's, k-means visual tokens) or mae (pixels, the encoder "
                        "over the visible patches; its decoder as configs/small_data_image_mae.yaml's; without joint, "
                        "whose compound stage trains MIM) (default: %(default)s)")
    p.add_argument("--preset", choices=tuple(SIZES), default="default",
                   help="the chain's size: " + "; ".join(f"{name}: {s[0]} scenes ({s[1]} held out), {s[2]} + {s[3]} + "
                                                         f"{s[4]} epochs (image-text blr {PAIR_BLR[name]})" for name, s in SIZES.items())
                        + " (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="--preset quick")
    p.add_argument("--train_size", type=int, help="synthetic training scenes (overrides the preset)")
    p.add_argument("--val_size", type=int, help="held-out scenes every probe is measured on (overrides the preset)")
    p.add_argument("--epochs", type=int, nargs=3, metavar=("MIM", "MLM", "ITC"), help="epochs of the three stages "
                   "(overrides the preset)")
    p.add_argument("--num_workers", type=int, default=2, help="data loader processes (default: %(default)s)")
    p.add_argument("--output_dir", default=None, help="default: outputs/continual_benchmark[_quick]")
    return p


def check_image_objective(args: argparse.Namespace, argv: list[str] | None) -> None:
    """joint's compound stage rehearses the image stage with MIM: no upper bound of an MAE chain.
    Left out of the default methods there; refused when named."""
    if args.image_objective != "mae" or JOINT not in args.methods:
        return
    named = "--methods" in (sys.argv[1:] if argv is None else argv)
    if named:
        raise UserError(f"--methods {JOINT} with --image_objective mae: joint's compound stage trains MIM, not MAE; "
                        f"leave {JOINT} out")
    args.methods = [m for m in args.methods if m != JOINT]


@cli_entry
def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parser().parse_args(argv)
    args.lambdas = parse_lambdas(args.lambdas)
    if args.quick and args.preset not in ("default", "quick"):
        raise UserError(f"--quick is --preset quick; drop it or --preset {args.preset}")
    args.preset = "quick" if args.quick else args.preset
    train, val, *epochs = SIZES[args.preset]
    args.sizes = (args.train_size or train, args.val_size or val, *(args.epochs or epochs))
    args.real = check_real_data(args)
    args.chain = chain(args.order, args.image_objective)
    check_image_objective(args, argv)
    order = ("_text_first" if args.order == "text-first" else "") + ("_mae" if args.image_objective == "mae" else "")
    args.output_dir = args.output_dir or (f"outputs/continual_benchmark{'_real' if args.real else ''}{order}"
                                          f"{'' if args.preset == 'default' else '_' + args.preset}")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; give a folder (new, or a benchmark's to continue it)")
    variants(args)  # a method or value named twice
    args.text_file = text_without_pair_captions(args.captions, args.pairs, out) if args.real else None
    check_every_run(args)
    start = time.time()
    per_seed = {seed: run_seed(args, seed) for seed in args.seeds}
    results = aggregate(per_seed, owner_for(args.order, args.image_objective))
    (out / "results.json").write_text(json.dumps(
        {"settings": {"methods": args.methods, "seeds": args.seeds, "preset": args.preset, "order": args.order,
                      "image_objective": args.image_objective, "lambdas": args.lambdas,
                      "wise_alpha": args.wise_alpha,
                      "replay_ratio": args.replay_ratio,
                      "lora_rank": args.lora_rank, "sizes": args.sizes, "pair_blr": PAIR_BLR[args.preset]}, "methods": results}, indent=1))
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\nchart: {write_chart(results, str(args.seeds[0]), out, args.chain)}; trade-off: {write_tradeoff(results, out)}; "
          f"results: {out / 'results.json'}; "
          f"{time.time() - start:.0f}s")
    return results


if __name__ == "__main__":
    main()
