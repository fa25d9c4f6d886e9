"""The whole continual chain on the embedded synthetic world, on a CPU, for λ = 0 and one λ > 0:

    image_mim → text_mlm (LoRA + self-reg) → merge → image_text_itc (LoRA + self-reg) → merge

and one table of held-out metrics after every stage, so the effect of self-regularization on what
the backbone already knew (image MIM and k-NN accuracy) is visible next to what it learned (MLM,
retrieval).

    python experiments/demo_chain.py                          # ~10 min on a 2-core CPU
    python experiments/demo_chain.py --reg_loss_weight 3e4 --output_dir outputs/chain_b
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import UserError, cli_entry  # noqa: E402
from custom_datasets.pair_data import caption_texts  # noqa: E402
from models.text_tokenizer import train_wordpiece  # noqa: E402
from training.cli import pretrain_config_from_argv  # noqa: E402
from training.pretrain import pretrain  # noqa: E402
from visualization.canvas import save_picture  # noqa: E402
from experiments.stage_chart import stage_chart  # noqa: E402

CHART = {"image_mim_acc": "image MIM accuracy", "image_mim_loss": "image MIM loss", "image_knn_acc": "image k-NN accuracy",
         "text_mlm_acc": "text MLM accuracy", "itc_t2i_r5": "text-to-image R@5"}
STAGES = ["image MIM", "text MLM", "image-text ITC"]
COLUMNS = {"image_mim_acc": "MIM acc", "image_mim_loss": "MIM loss", "image_knn_acc": "k-NN acc",
           "text_mlm_acc": "MLM acc",
           "itc_i2t_r1": "i2t R@1", "itc_i2t_r5": "i2t R@5", "itc_t2i_r1": "t2i R@1", "itc_t2i_r5": "t2i R@5"}


def shared_flags(args: argparse.Namespace, tokenizer: Path) -> list[str]:
    return ["--model", "vlmo_tiny_patch16", "--image_size", "64", "--patch_size", "8", "--second_image_size", "32",
            "--data_path", "synthetic", "--synthetic_train_size", str(args.train_size), "--synthetic_val_size", str(args.val_size),
            "--synthetic_render_size", "64", "--drop_path", "0", "--batch_size", "64",
            "--num_workers", str(args.num_workers), "--print_freq", "25", "--tokenizer", str(tokenizer),
            "--seed", str(args.seed), "--save_per_epochs", "1000"]


CROPS = ["--min_crop_scale", "0.5"]  # the stages that read images


def run_stage(argv: list[str], output_dir: Path) -> dict:
    if (output_dir / "stage_report.json").is_file():  # finished earlier: reuse (nothing is overwritten)
        print(f"reusing {output_dir}")
        return json.loads((output_dir / "stage_report.json").read_text())
    pretrain(pretrain_config_from_argv(argv + ["--output_dir", str(output_dir)]))
    return json.loads((output_dir / "stage_report.json").read_text())


def print_table(rows: list[tuple[str, dict]]) -> None:
    print("\n| stage | " + " | ".join(COLUMNS.values()) + " |")
    print("| --- |" + " --- |" * len(COLUMNS))
    for name, report in rows:
        cells = [f"{report[k]:.3f}" if k in report else "" for k in COLUMNS]
        print(f"| {name} | " + " | ".join(cells) + " |")


def write_forgetting_chart(rows: list[tuple[str, dict]], weights: list[float], out: Path) -> Path:
    """The chart of every metric across the stages, one line per λ, as a PNG and in TensorBoard
    (scalars `chain/<metric>/<λ>` with the stage as step, and the picture)."""
    from torch.utils.tensorboard import SummaryWriter

    runs = {f"lambda = {w:g}": [rows[0][1], rows[1 + 2 * i][1], rows[2 + 2 * i][1]] for i, w in enumerate(weights)}
    writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=0)  # a re-run replaces, not doubles
    for run, reports in runs.items():
        for step, report in enumerate(reports):
            for key in CHART:
                if key in report:
                    writer.add_scalar(f"chain/{key}/{run.replace(' = ', '_')}", report[key], step)
    path = save_picture(stage_chart(STAGES, runs, CHART), out / "forgetting_chart.png", writer, "chain/forgetting_chart")
    writer.close()
    return path


def mim_checkpoint(out: Path, mim_epochs: int) -> Path:
    """The image MIM stage's only checkpoint (`--save_per_epochs 1000`: the last epoch's)."""
    return out / "1_image_mim" / f"checkpoint-{mim_epochs - 1}.pth"


def itc_checkpoint(out: Path, weight: float, itc_epochs: int) -> Path:
    """The chain's last checkpoint for λ = `weight` (the image-text stage's last epoch)."""
    return out / f"3_image_text_itc_lambda_{weight:g}" / f"checkpoint-{itc_epochs - 1}.pth"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/demo_chain", help="one folder per stage, the table, the chart "
                   "(default: %(default)s); finished stages found there are reused")
    p.add_argument("--reg_loss_weight", type=float, default=1e4, help="λ of the self-regularized run; the other "
                   "run has λ = 0 (default: %(default)g)")
    p.add_argument("--lora_rank", type=int, default=16, help="LoRA rank of the text and image-text stages "
                   "(default: %(default)s)")
    p.add_argument("--train_size", type=int, default=2000, help="synthetic training images (default: %(default)s)")
    p.add_argument("--val_size", type=int, default=300, help="held-out images every metric is measured on "
                   "(default: %(default)s)")
    p.add_argument("--mim_epochs", type=int, default=10, help="epochs of the image MIM stage (default: %(default)s)")
    p.add_argument("--mlm_epochs", type=int, default=6, help="epochs of each text MLM stage (default: %(default)s)")
    p.add_argument("--itc_epochs", type=int, default=8, help="epochs of each image-text stage (default: %(default)s)")
    p.add_argument("--num_workers", type=int, default=2, help="data loader processes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, masks and initialization (default: %(default)s)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> list[tuple[str, dict]]:
    args = parser().parse_args(argv)
    if args.reg_loss_weight <= 0:
        raise UserError("--reg_loss_weight must be > 0 (the λ = 0 run is always made too)")
    out = Path(args.output_dir)
    start = time.time()
    tokenizer = out / "text_tokenizer"
    if not (tokenizer / "vocab.txt").is_file():
        made = train_wordpiece(caption_texts(["synthetic"], args.train_size, args.seed), 512, tokenizer)
        print(f"saved a {len(made)}-token WordPiece tokenizer to {tokenizer}")
    common = shared_flags(args, tokenizer)
    rows = [("image_mim", run_stage(common + CROPS + ["--exp_name", "image_mim", "--epochs", str(args.mim_epochs),
                                              "--visual_vocab_size", "128"], out / "1_image_mim"))]
    visual = ["--d_vae_weight_path", str(out / "1_image_mim" / "visual_tokenizer.safetensors")]
    mim_ckpt = mim_checkpoint(out, args.mim_epochs)
    weights = [0.0, args.reg_loss_weight]
    for weight in weights:
        tag = f"lambda_{weight:g}"
        lora = ["--lora_rank", str(args.lora_rank), "--save_merged_lora_model"]
        if weight > 0:
            lora += ["--self_regularization", "--reg_loss_weight", str(weight)]
        mlm_dir, itc_dir = out / f"2_text_mlm_{tag}", itc_checkpoint(out, weight, args.itc_epochs).parent
        rows.append((f"text_mlm, λ={weight:g}", run_stage(
            common + visual + lora + ["--exp_name", "text_mlm", "--epochs", str(args.mlm_epochs), "--blr", "5e-3",
                                      "--init_from", str(mim_ckpt)], mlm_dir)))
        rows.append((f"image_text_itc, λ={weight:g}", run_stage(
            common + CROPS + visual + lora + ["--exp_name", "image_text_itc", "--epochs", str(args.itc_epochs), "--blr", "2e-2",
                                      "--batch_size", "32",  # more steps: contrastive learning from scratch needs them
                                      "--init_from", str(mlm_dir / "merged_model.safetensors")], itc_dir)))
        print_table(rows)
    print(f"\nchain done in {time.time() - start:.0f}s; chance: MIM 1/128, k-NN 1/8 (colour of the first object), "
          f"R@1 1/{args.val_size}")
    (out / "chain_report.json").write_text(json.dumps(rows, indent=1))
    print(f"forgetting chart: {write_forgetting_chart(rows, weights, out)}")
    return rows


if __name__ == "__main__":
    main()
