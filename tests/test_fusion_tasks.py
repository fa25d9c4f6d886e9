"""VQA and NLVR2 fine-tuning end to end on the synthetic world's questions and statements (written
in the official layouts): the checkpoints describe themselves, --eval reproduces their metrics,
VQA writes the challenge's results file (alone on a split without annotations), predict answers
and judges from the checkpoint and from its ONNX export, and both tasks learn above their baselines."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from common.vqa_accuracy import vqa_accuracy
from custom_datasets import synthetic_reasoning as synthetic
from custom_datasets.synthetic_world import SyntheticWorld
from custom_datasets.vqa_data import read_vqa_split
from main_finetune import main as finetune
from models.checkpoints import read_model_checkpoint
from models.downstream.vqa import VisualQuestionAnswering
from models.text_tokenizer import train_wordpiece
from util.export import main as export
from util.predict import main as predict

TINY = ["--input_size", "32", "--patch_size", "8", "--model", "vlmo_tiny_patch16", "--num_workers", "0",
        "--drop_path", "0", "--print_freq", "1000", "--aa", "", "--batch_size", "16", "--warmup_epochs", "1"]


@pytest.fixture(scope="module")
def word_pieces(tmp_path_factory):
    """A tokenizer that knows the questions' and statements' words."""
    import random

    world = SyntheticWorld("train", 400, seed=0)
    texts = [world.scene(i).caption for i in range(400)]
    texts += [q for i in range(400) for q, _, _ in synthetic.questions_about(world.scene(i), random.Random(i))]
    texts += [synthetic.balanced_statement(world.scene(i), world.scene(i + 1), random.Random(i))[0] for i in range(400)]
    folder = tmp_path_factory.mktemp("tok") / "tok"
    train_wordpiece(texts, 300, folder)
    return str(folder)


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory, word_pieces):
    root = tmp_path_factory.mktemp("vqa")
    data = synthetic.write_synthetic_vqa(root / "data", 60, 20, size=32)
    out = root / "run"
    stats = finetune(TINY + ["--task", "vqa", "--data_path", str(data), "--tokenizer", word_pieces, "--epochs", "2",
                             "--lr", "1e-3", "--vqa_answers", "12", "--output_dir", str(out)])
    return data, out, stats


def test_vqa_checkpoint_results_file_and_eval(vqa_run, tmp_path):
    data, out, stats = vqa_run
    ckpt = read_model_checkpoint(str(out / "checkpoint-best.pth"))
    assert ckpt.info["task"] == "vqa" and ckpt.info["heads"]["vqa_head"]["num_outputs"] == 12
    assert ckpt.info["preprocessing"]["crop_mode"] == "squash"  # the whole image, as it was evaluated
    answers = ckpt.info["class_names"]
    results = json.loads((out / "vqa_results.json").read_text())
    held_out = read_vqa_split(data, "val2014", need_answers=True)
    assert [r["question_id"] for r in results] == sorted(q.question_id for q in held_out)  # each once
    assert {r["answer"] for r in results} <= set(answers)
    by_id = {q.question_id: q for q in held_out}
    official = 100 * sum(vqa_accuracy(r["answer"], by_id[r["question_id"]].answers) for r in results) / len(results)
    assert stats["test_vqa_acc"] == pytest.approx(official)  # the metric is the official scoring of the file
    again = finetune(TINY + ["--task", "vqa", "--data_path", str(data), "--eval", "--finetune",
                             str(out / "checkpoint-best.pth"), "--output_dir", str(tmp_path / "eval")])
    assert again["vqa_acc"] == pytest.approx(stats["best_vqa_acc"], abs=1e-4)
    assert json.loads((tmp_path / "eval" / "vqa_results.json").read_text()) == results or \
        stats["best_epoch"] != 1


def test_vqa_on_a_split_without_annotations_writes_answers_only(vqa_run, tmp_path, word_pieces, capsys):
    data, out, _ = vqa_run
    questions = json.loads((data / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    (data / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(json.dumps(questions))
    (data / "test2015").mkdir(exist_ok=True)
    for image in (data / "val2014").iterdir():
        (data / "test2015" / image.name.replace("val2014", "test2015")).write_bytes(image.read_bytes())
    flags = TINY + ["--task", "vqa", "--data_path", str(data), "--vqa_eval_split", "test-dev2015"]
    with pytest.raises(SystemExit):
        finetune(flags + ["--tokenizer", word_pieces, "--output_dir", str(tmp_path / "train")])
    assert "cannot be trained or scored" in capsys.readouterr().err
    stats = finetune(flags + ["--eval", "--finetune", str(out / "checkpoint-best.pth"), "--output_dir",
                              str(tmp_path / "eval")])
    assert stats == {"answered": len(questions["questions"])}
    assert len(json.loads((tmp_path / "eval" / "vqa_results.json").read_text())) == len(questions["questions"])


def test_vqa_predict_and_onnx_export_answer_alike(vqa_run, tmp_path, capsys):
    data, out, _ = vqa_run
    image = next((data / "val2014").iterdir())
    question = "what color is the background?"
    from_checkpoint = predict(["--checkpoint", str(out / "checkpoint-best.pth"), "--input", str(image), "--question",
                               question, "--output", str(tmp_path / "a.json"), "--topk", "3"])["predictions"]
    export(["--checkpoint", str(out / "checkpoint-best.pth"), "--format", "onnx", "--output", str(tmp_path / "onnx")])
    from_onnx = predict(["--checkpoint", str(tmp_path / "onnx"), "--input", str(image), "--question", question,
                         "--output", str(tmp_path / "b.json"), "--topk", "3"])["predictions"]
    mine, theirs = from_checkpoint[str(image)], from_onnx[str(image)]
    assert mine["question"] == question and len(mine["topk"]) == 3
    assert [t["answer"] for t in mine["topk"]] == [t["answer"] for t in theirs["topk"]]
    assert [t["score"] for t in mine["topk"]] == pytest.approx([t["score"] for t in theirs["topk"]], abs=1e-4)
    with pytest.raises(SystemExit):
        predict(["--checkpoint", str(out / "checkpoint-best.pth"), "--input", str(image)])
    assert "pass --question" in capsys.readouterr().err


def test_the_vqa_accuracy_counts_each_question_once_and_per_answer_type():
    """A distributed sampler pads with repeats: question 2 arrives twice but counts once."""
    from models import create_model
    from models.downstream import DownstreamOptions

    task = VisualQuestionAnswering(create_model("vlmo_tiny_patch16", img_size=32, patch_size=8, vocab_size=50),
                                   DownstreamOptions(num_classes=3, class_names=("yes", "no", "2")))
    task.start_evaluation()
    task.collected = [(torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([1.0, 0.3])),
                      (torch.tensor([2, 3]), torch.tensor([2, 1]), torch.tensor([1, 2]), torch.tensor([0.3, 0.0]))]
    stats = task.finish_evaluation({"vqa_acc": 0.0, "loss": 1.0})
    assert stats["vqa_acc"] == pytest.approx(100 * 1.3 / 3)
    assert stats["vqa_acc_yes_no"] == 100 and stats["vqa_acc_number"] == pytest.approx(30) and stats["vqa_acc_other"] == 0
    assert task.held_out_outputs()["vqa_results.json"] == [{"question_id": 1, "answer": "yes"},
                                                            {"question_id": 2, "answer": "2"},
                                                            {"question_id": 3, "answer": "no"}]


def test_nlvr2_end_to_end_judges_from_the_checkpoint_and_the_export(tmp_path, word_pieces, capsys):
    data = synthetic.write_synthetic_nlvr2(tmp_path / "data", 40, 12, size=32)
    out = tmp_path / "run"
    stats = finetune(TINY + ["--task", "nlvr2", "--data_path", str(data), "--tokenizer", word_pieces, "--epochs", "1",
                             "--output_dir", str(out)])
    ckpt = read_model_checkpoint(str(out / "checkpoint-best.pth"))
    assert ckpt.info["heads"]["nlvr2_head"] == {"kind": "answer", "in_features": 384, "hidden": 384, "num_outputs": 2}
    again = finetune(TINY + ["--task", "nlvr2", "--data_path", str(data), "--eval", "--finetune",
                             str(out / "checkpoint-best.pth"), "--output_dir", str(tmp_path / "eval")])
    assert again["acc1"] == pytest.approx(stats["best_acc1"], abs=1e-4)
    left, right = data / "dev" / "dev-0-0-img0.png", data / "dev" / "dev-0-0-img1.png"
    statement = json.loads((data / "dev.json").read_text().splitlines()[0])["sentence"]
    judged = predict(["--checkpoint", str(out / "checkpoint-best.pth"), "--input", str(left), str(right),
                      "--statement", statement, "--output", str(tmp_path / "a.json")])["predictions"]
    swapped = predict(["--checkpoint", str(out / "checkpoint-best.pth"), "--input", str(right), str(left),
                       "--statement", statement, "--output", str(tmp_path / "b.json")])["predictions"]
    assert judged["probability_true"] != swapped["probability_true"]  # left and right are not interchangeable
    export(["--checkpoint", str(out / "checkpoint-best.pth"), "--format", "onnx", "--output", str(tmp_path / "onnx")])
    exported = predict(["--checkpoint", str(tmp_path / "onnx"), "--input", str(left), str(right), "--statement",
                        statement, "--output", str(tmp_path / "c.json")])["predictions"]
    assert exported["probability_true"] == pytest.approx(judged["probability_true"], abs=1e-4)
    with pytest.raises(SystemExit):
        predict(["--checkpoint", str(out / "checkpoint-best.pth"), "--input", str(left), "--statement", statement])
    assert "exactly two images" in capsys.readouterr().err


def test_vqa_learns_above_the_majority_answer(tmp_path, word_pieces):
    data = synthetic.write_synthetic_vqa(tmp_path / "data", 300, 60, size=32)
    stats = finetune(TINY + ["--task", "vqa", "--data_path", str(data), "--tokenizer", word_pieces, "--epochs", "5",
                             "--lr", "1e-3", "--output_dir", str(tmp_path / "run")])
    train, val = (read_vqa_split(data, split, True) for split in ("train2014", "val2014"))
    majority = Counter(a for q in train for a in q.answers).most_common(1)[0][0]
    baseline = 100 * sum(vqa_accuracy(majority, q.answers) for q in val) / len(val)
    print("VQA learning:", stats["best_vqa_acc"], majority, baseline)
    assert stats["best_vqa_acc"] > baseline + 10, (stats["best_vqa_acc"], majority, baseline)


@pytest.mark.slow  # ~40 s; test_nlvr2_end_to_end_judges_from_the_checkpoint_and_the_export covers the path by default
def test_nlvr2_learns_above_chance(tmp_path, word_pieces):
    """Half the statements are true; from random init about 280 steps get well above 50%."""
    data = synthetic.write_synthetic_nlvr2(tmp_path / "data", 1500, 200, size=32)
    stats = finetune(TINY + ["--task", "nlvr2", "--data_path", str(data), "--tokenizer", word_pieces, "--epochs", "3",
                             "--lr", "5e-4", "--layer_decay", "0.9", "--output_dir", str(tmp_path / "run")])
    assert stats["best_acc1"] > 60, stats
