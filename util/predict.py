"""Classify or segment images, answer questions about them, or judge a statement about two, with a
fine-tuned checkpoint (or its ONNX export): one JSON object `{path: {"class", "label", "score",
"topk": [...]}}` (segmentation: `{path: {"mask", "overlay", "classes"}}` with a class-index PNG and
an overlay per image; VQA: `{path: {"question", "answer", "score", "topk"}}`; NLVR2: `{"statement",
"images", "true", "probability_true"}`) and a console line each; unreadable files are reported, not
fatal. Preprocessing, class names (VQA: answers) and the text tokenizer come from the checkpoint (or
the export's run_info.json).

    python util/predict.py --checkpoint outputs/finetune_image_classification/checkpoint-best.pth \\
        --input photos/ --output predictions.json --topk 5 [--class_names names.txt]
    python util/predict.py --checkpoint outputs/finetune_vqa/checkpoint-best.pth --input photo.jpg \\
        --question "what color is the car?"
    python util/predict.py --checkpoint outputs/finetune_nlvr2/checkpoint-best.pth --input left.jpg right.jpg \\
        --statement "both images show a dog"
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.errors import UserError, cli_entry  # noqa: E402
from custom_datasets.classification_data import recorded_transform  # noqa: E402
from custom_datasets.image_folder import list_image_files  # noqa: E402
from custom_datasets.image_io import is_image_file, open_rgb  # noqa: E402
from serving import open_servable  # noqa: E402
from serving.result_files import check_output, errors_path, reason, write_results  # noqa: E402


def read_class_names(path: str | None, saved: list[str] | None, num_classes: int) -> list[str]:
    if path:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"--class_names {file} does not exist")
        names = json.loads(file.read_text()) if file.suffix == ".json" else \
            [line.strip() for line in file.read_text().splitlines() if line.strip()]
        if len(names) != num_classes:
            raise UserError(f"--class_names {file} lists {len(names)} names but the classifier has {num_classes} classes")
        return list(names)
    return saved if saved and len(saved) == num_classes else [str(i) for i in range(num_classes)]


def segment_files(servable, files: list[Path], args) -> dict:
    """Segmentation checkpoints: a mask PNG and an overlay per image in --mask_dir, and the JSON."""
    from serving.segmentation import predict_masks

    names = read_class_names(args.class_names, servable.class_names, servable.num_classes)
    output = Path(args.output)
    mask_dir = Path(args.mask_dir) if args.mask_dir else output.with_name(output.stem + "_masks")
    results, failed = predict_masks(servable.to(torch.device(args.device)), files, names, mask_dir, open_rgb)
    write_results(output, results, failed)
    print(f"{len(results)} images segmented, {len(failed)} unreadable; masks and overlays in {mask_dir}; wrote {output}")
    return {"predictions": results, "errors": failed}


def input_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        source = Path(item)
        if not source.exists():
            raise UserError(f"--input {source} does not exist; check the path")
        if source.is_file():
            if not is_image_file(source):
                raise UserError(f"--input {source} is not an image file")
            files.append(source)
        else:
            files.extend(list_image_files(source, "--input"))
    return files


def check_arguments(args) -> None:
    """Before anything is loaded or classified."""
    if args.topk < 1:
        raise UserError(f"--topk {args.topk}: list at least 1 answer per input")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
    check_output(Path(args.output), args.overwrite)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a fine-tuned checkpoint, or an ONNX export folder of one")
    p.add_argument("--input", required=True, nargs="+", help="images or folders (searched recursively); NLVR2: the "
                   "left and the right image")
    p.add_argument("--question", default=None, help="VQA checkpoints: the question asked about each image")
    p.add_argument("--statement", default=None, help="NLVR2 checkpoints: the statement judged against the two images")
    p.add_argument("--output", default="predictions.json")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--topk", type=int, default=5, help="answers listed per input (at least 1)")
    p.add_argument("--class_names", default=None, help=".txt (one per line) or .json list; default: the checkpoint's")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--mask_dir", default=None, help="segmentation checkpoints: where <name>_mask.png (class indices, "
                   "colour palette) and <name>_overlay.png go (default: next to --output, <output>_masks/)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    check_arguments(args)
    files = input_files(args.input)
    servable = open_servable(args.checkpoint)
    task = servable.fusion_task
    if task is not None or args.question is not None or args.statement is not None:
        from serving.fusion import answer_questions, judge_statement

        asks = task == "vqa" or (task is None and args.question is not None)  # the sentence names the flag given
        return (answer_questions if asks else judge_statement)(servable, files, args)
    if getattr(servable, "has_segmenter", False):
        return segment_files(servable, files, args)
    if not servable.has_classifier:
        raise UserError(f"{args.checkpoint} has no classifier; fine-tune one with main_finetune.py --task image_classification")
    names = read_class_names(args.class_names, servable.class_names, servable.num_classes)
    servable.to(torch.device(args.device))
    transform = recorded_transform(servable.preprocessing)  # the held-out view the run evaluated with
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    k = min(args.topk, len(names))
    for start in range(0, len(files), args.batch_size):
        chunk, tensors = [], []
        for path in files[start:start + args.batch_size]:
            try:
                tensors.append(transform(open_rgb(path)))
                chunk.append(path)
            except Exception as err:  # noqa: BLE001 - unreadable files are reported, not fatal
                failed[str(path)] = reason(err)
                print(f"{path}: unreadable ({failed[str(path)]})")
        if not tensors:
            continue
        probs = servable.classify(torch.stack(tensors)).float().softmax(-1)
        for path, row in zip(chunk, probs):
            scores, ids = row.topk(k)
            top = [{"class": int(i), "label": names[int(i)], "score": round(float(s), 6)} for s, i in zip(scores, ids)]
            results[str(path)] = {**top[0], "topk": top}
            print(f"{path}: {top[0]['label']} ({top[0]['score']:.3f})")
    output = Path(args.output)
    write_results(output, results, failed)
    print(f"{len(results)} images classified, {len(failed)} unreadable; wrote {output}"
          + (f" and {errors_path(output)}" if failed else ""))
    return {"predictions": results, "errors": failed}


if __name__ == "__main__":
    main()
