"""Prediction with a fused-pair classifier: answer a question about each image (VQA: the top
answers with their sigmoid scores), or judge a statement against a left and a right image (NLVR2:
the probability that it is true). The text is tokenized with the tokenizer the checkpoint records
and the images get the held-out view it records."""
from __future__ import annotations

from pathlib import Path

import torch

from common.errors import UserError
from custom_datasets.classification_data import recorded_transform
from custom_datasets.image_io import open_rgb
from custom_datasets.text_collate import tokenize_captions
from serving.result_files import reason, write_results


def encoded_text(servable, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = servable.text_tokenizer()
    if tokenizer is None:
        raise UserError(f"{servable.source} records no text tokenizer; re-export it from its checkpoint")
    enc = tokenize_captions(tokenizer, [text], servable.max_text_len)
    return enc["input_ids"], enc["attention_mask"]


def answer_questions(servable, files: list[Path], args) -> dict:
    if servable.fusion_task != "vqa":
        raise UserError(f"--question needs a VQA checkpoint (main_finetune.py --task vqa); {args.checkpoint} is not one")
    if not args.question:
        raise UserError("a VQA checkpoint answers a question about each image: pass --question \"...\"")
    ids, mask = encoded_text(servable, args.question)
    transform = recorded_transform(servable.preprocessing)
    answers = servable.class_names or [str(i) for i in range(servable.num_classes)]
    results, failed = {}, {}
    for path in files:
        try:
            image = transform(open_rgb(path))
        except Exception as err:  # noqa: BLE001 - unreadable files are reported, not fatal
            failed[str(path)] = reason(err)
            print(f"{path}: unreadable ({failed[str(path)]})")
            continue
        scores = servable.fused_logits([image[None]], ids, mask).sigmoid()[0]
        values, indices = scores.topk(min(args.topk, len(answers)))
        top = [{"answer": answers[int(i)], "score": round(float(v), 6)} for v, i in zip(values, indices)]
        results[str(path)] = {"question": args.question, **top[0], "topk": top}
        print(f"{path}: {args.question} -> {top[0]['answer']} ({top[0]['score']:.3f})")
    output = Path(args.output)
    write_results(output, results, failed)
    print(f"{len(results)} images answered, {len(failed)} unreadable; wrote {output}")
    return {"predictions": results, "errors": failed}


def judge_statement(servable, files: list[Path], args) -> dict:
    if servable.fusion_task != "nlvr2":
        raise UserError(f"--statement needs an NLVR2 checkpoint (main_finetune.py --task nlvr2); {args.checkpoint} is "
                        f"not one")
    if not args.statement:
        raise UserError("an NLVR2 checkpoint judges a statement about two images: pass --statement \"...\"")
    if len(files) != 2:
        raise UserError(f"--statement is judged against exactly two images (--input LEFT RIGHT); got {len(files)}")
    transform = recorded_transform(servable.preprocessing)
    try:
        left, right = (transform(open_rgb(path))[None] for path in files)
    except Exception as err:  # noqa: BLE001 - one sentence, not a traceback
        raise UserError(f"--input: {reason(err)}") from None
    ids, mask = encoded_text(servable, args.statement)
    probability = float(servable.fused_logits([left, right], ids, mask).softmax(-1)[0, 1])
    result = {"statement": args.statement, "images": [str(f) for f in files], "true": probability > 0.5,
              "probability_true": round(probability, 6)}
    output = Path(args.output)
    write_results(output, result, {})
    print(f"{args.statement!r} about {files[0]} | {files[1]}: {'true' if result['true'] else 'false'} "
          f"(p = {probability:.3f}); wrote {output}")
    return {"predictions": result, "errors": {}}
