"""Does the pretrained chain help image-text reasoning? Fine-tune VQA, NLVR2 and re-ranked retrieval
on the synthetic world's questions, statements and captions from a pretrained checkpoint and from
random init with identical settings, and print one table against each task's baseline: the
majority answer (VQA), 50% (NLVR2, half the statements are true), and contrastive retrieval
without re-ranking.

    python experiments/fusion_experiment.py --pretrained outputs/demo_chain/3_image_text_itc_lambda_10000/checkpoint-7.pth

The data are written in VQAv2's, NLVR2's and the pair files' layouts under OUTPUT_DIR/data and read
by the same readers as real data; every run's log is in its folder.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import UserError, cli_entry  # noqa: E402
from common.vqa_accuracy import vqa_accuracy  # noqa: E402
from custom_datasets import synthetic_reasoning as synthetic  # noqa: E402
from custom_datasets.vqa_data import read_vqa_split  # noqa: E402
from models.checkpoints import read_model_checkpoint  # noqa: E402
from models.text_tokenizer import write_tokenizer_folder  # noqa: E402
from training.cli import finetune_config_from_argv  # noqa: E402
from training.finetune import finetune  # noqa: E402

INITS = ("pretrained", "random init")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="checkpoint of a pretraining stage that read text (it records "
                   "its tokenizer), e.g. the demo chain's last")
    p.add_argument("--output_dir", default="outputs/fusion_experiment", help="the data, one folder per run and "
                   "results.json (default: %(default)s)")
    p.add_argument("--vqa_scenes", type=int, nargs=2, default=[400, 150], help="train / val scenes, 3 questions each "
                   "(default: %(default)s)")
    p.add_argument("--nlvr2_statements", type=int, nargs=2, default=[600, 200], help="(default: %(default)s)")
    p.add_argument("--retrieval_pairs", type=int, nargs=2, default=[500, 150], help="(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=6, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr of every run (default: %(default)s)")
    p.add_argument("--layer_decay", type=float, default=0.75, help="(default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--rerank_k", type=int, default=8, help="retrieval shortlist re-ranked (default: %(default)s)")
    p.add_argument("--num_workers", type=int, default=1, help="data loader processes (default: %(default)s)")
    return p


def majority_answer(data: Path) -> tuple[str, float]:
    """The most frequent training answer, and its official accuracy on every val question."""
    train = read_vqa_split(data, "train2014", need_answers=True)
    answer = Counter(a for q in train for a in q.answers).most_common(1)[0][0]
    val = read_vqa_split(data, "val2014", need_answers=True)
    return answer, 100 * sum(vqa_accuracy(answer, q.answers) for q in val) / len(val)


def run(task: str, flags: list[str], out: Path) -> dict:
    started = time.time()
    stats = finetune(finetune_config_from_argv(["--task", task, "--output_dir", str(out)] + flags))
    return {**stats, "seconds": time.time() - started}


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    ckpt = read_model_checkpoint(args.pretrained)
    record = ckpt.info.get("text_tokenizer")
    if not record:
        raise UserError(f"--pretrained {args.pretrained} records no text tokenizer; use a checkpoint of a stage that "
                        f"read text (text_mlm, image_text_itc, compound_pretrain)")
    cfg = ckpt.backbone_config or {}
    size, patch = int(cfg.get("img_size", 64)), int(cfg.get("patch_size", 16))
    out, start = Path(args.output_dir), time.time()
    tokenizer = out / "data" / "text_tokenizer"
    write_tokenizer_folder(tokenizer, record["vocab"], record.get("lowercase", True))  # random init reads it too
    vqa = synthetic.write_synthetic_vqa(out / "data" / "vqa", *args.vqa_scenes, size=size)
    nlvr2 = synthetic.write_synthetic_nlvr2(out / "data" / "nlvr2", *args.nlvr2_statements, size=size)
    pairs = synthetic.write_synthetic_pairs(out / "data" / "pairs", *args.retrieval_pairs, size=size)
    common = ["--input_size", str(size), "--epochs", str(args.epochs), "--batch_size", str(args.batch_size),
              "--lr", str(args.lr), "--layer_decay", str(args.layer_decay),
              "--warmup_epochs", "1", "--drop_path", "0", "--aa", "", "--num_workers", str(args.num_workers),
              "--print_freq", "1000", "--tokenizer", str(tokenizer)]
    tasks = {"vqa": ["--data_path", str(vqa)], "nlvr2": ["--data_path", str(nlvr2)],
             "image_text_retrieval": ["--data_path", str(pairs), "--data_file_path", str(pairs / "train.json"),
                                      "--eval_data_file_path", str(pairs / "val.json"), "--rerank_k",
                                      str(args.rerank_k)]}
    weights = {"pretrained": ["--finetune", args.pretrained],
               "random init": ["--model", "vlmo_tiny_patch16", "--patch_size", str(patch)]}
    results = {task: {init: run(task, flags + common + weights[init], out / f"{task}_{init.replace(' ', '_')}")
                      for init in INITS} for task, flags in tasks.items()}
    answer, majority = majority_answer(vqa)
    results["baselines"] = {"vqa_majority_answer": answer, "vqa_majority_acc": majority, "nlvr2_chance": 50.0}
    results["seconds"] = time.time() - start
    print_table(results, args)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    return results


def print_table(results: dict, args) -> None:
    base = results["baselines"]
    print(f"\nsynthetic world, {args.epochs} epochs each, batch {args.batch_size}, lr {args.lr}, layer decay "
          f"{args.layer_decay}, {results['seconds']:.0f}s")
    print("| backbone | VQA acc. (best / last) | yes/no / number / other | NLVR2 acc. (best / last) | "
          f"retrieval R@1 i→t / t→i, contrastive | re-ranked top {args.rerank_k} |\n| --- | --- | --- | --- | --- | --- |")
    for init in INITS:
        v, n, r = (results[t][init] for t in ("vqa", "nlvr2", "image_text_retrieval"))
        kinds = " / ".join(f"{v.get(f'test_vqa_acc_{k}', float('nan')):.1f}" for k in ("yes_no", "number", "other"))
        print(f"| {init} | {v['best_vqa_acc']:.1f} / {v['test_vqa_acc']:.1f} | {kinds} | {n['best_acc1']:.1f} / "
              f"{n['test_acc1']:.1f} | {100 * r['test_itc_i2t_r1']:.1f} / {100 * r['test_itc_t2i_r1']:.1f} | "
              f"{100 * r['test_rerank_i2t_r1']:.1f} / {100 * r['test_rerank_t2i_r1']:.1f} |")
    print(f"| baseline | {base['vqa_majority_acc']:.1f} (always \"{base['vqa_majority_answer']}\") | | 50.0 (chance) | | |")


if __name__ == "__main__":
    main()
