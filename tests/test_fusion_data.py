"""The VQAv2 and NLVR2 readers on small files in the official layouts (written here), their
mistakes in one sentence, and the synthetic questions and statements they are demoed with."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from PIL import Image

from common.errors import UserError
from custom_datasets.nlvr2_data import StatementPairs, read_nlvr2_split
from custom_datasets.synthetic_reasoning import balanced_statement, human_answers, questions_about
from custom_datasets.synthetic_world import SyntheticWorld
from custom_datasets.vqa_data import AnswerVocabulary, VQAQuestions, read_vqa_split, vqa_splits


def answers(*values: str) -> list[dict]:
    return [{"answer": v, "answer_confidence": "yes", "answer_id": i + 1} for i, v in enumerate(values)]


def write_vqa(root, split: str, questions: list[dict], annotations: list[dict] | None, folder: str | None = None):
    """VQAv2's files as distributed (with their info/license fields) and COCO-named images."""
    (root / "questions").mkdir(parents=True, exist_ok=True)
    (root / "questions" / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps(
        {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": split,
         "questions": questions}))
    if annotations is not None:
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps(
            {"info": {}, "license": {}, "data_subtype": split, "annotations": annotations}))
    folder = folder or split
    (root / folder).mkdir(exist_ok=True)
    for q in questions:
        if isinstance(q, dict) and isinstance(q.get("image_id"), int):
            Image.new("RGB", (40, 30), (q["image_id"] * 20 % 255, 90, 30)).save(
                root / folder / f"COCO_{folder}_{q['image_id']:012d}.jpg")


def annotation(qid: int, image_id: int, *values: str, kind: str = "other") -> dict:
    return {"question_id": qid, "image_id": image_id, "answer_type": kind, "question_type": "what",
            "multiple_choice_answer": values[0], "answers": answers(*values)}


@pytest.fixture
def vqa_root(tmp_path):
    questions = [{"image_id": 1, "question": "What color is it?", "question_id": 10},
                 {"image_id": 1, "question": "Is it red?", "question_id": 11},
                 {"image_id": 2, "question": "How many?", "question_id": 20},
                 {"image_id": 2, "question": "No annotation?", "question_id": 21},
                 {"question": "malformed: no ids"}]
    notes = [annotation(10, 1, *["red"] * 8, "orange", "Red"), annotation(11, 1, *["yes"] * 10, kind="yes/no"),
             annotation(20, 2, *["two"] * 6, *["3"] * 4, kind="number")]
    write_vqa(tmp_path, "train2014", questions, notes)
    write_vqa(tmp_path, "val2014", questions[:3], notes)
    write_vqa(tmp_path, "test-dev2015", [{"image_id": 5, "question": "Where?", "question_id": 50}], None,
              folder="test2015")
    return tmp_path


def test_vqa_questions_are_read_with_their_human_answers_and_coco_images(vqa_root, capsys):
    questions = read_vqa_split(vqa_root, "train2014", need_answers=True)
    assert [q.question_id for q in questions] == [10, 11, 20]  # 21 has no annotation, one is malformed
    assert "skipped 2 of 5 questions" in capsys.readouterr().out
    assert questions[0].answers == tuple(["red"] * 8 + ["orange", "Red"])
    assert [q.answer_type for q in questions] == ["other", "yes/no", "number"]
    assert questions[2].image == vqa_root / "train2014" / "COCO_train2014_000000000002.jpg"
    test_dev = read_vqa_split(vqa_root, "test-dev2015", need_answers=False)
    assert test_dev[0].answers == () and test_dev[0].image.parent.name == "test2015"  # test-dev's images are test2015's


def test_vqa_samples_carry_targets_and_official_scores(vqa_root):
    from custom_datasets.classification_data import LabelledSample, whole_image_transform
    from custom_datasets.settings import AugmentSettings

    train, held_out, vocabulary = vqa_splits(vqa_root, ["train2014"], "val2014", 3, evaluate_only=False)
    assert vocabulary.answers == ["yes", "red", "2"]  # 10, 9 ("Red" is red), 6
    data = VQAQuestions(held_out, vocabulary, "min_n_over_3", LabelledSample(whole_image_transform(
        AugmentSettings(aa=""), 32, False)), "VQA val2014")
    sample = data[0]
    assert sample["image"].shape == (3, 32, 32) and sample["caption"] == "What color is it?"
    assert sample["vqa_targets"].tolist() == [0, 1, 0]
    assert sample["vqa_scores"].tolist() == pytest.approx([0, 1, 0])
    # 6 humans said "two", 4 "3": they disagree, so the official code normalises them ("two" is "2"); the
    # pre-2021 code processed only their punctuation, and "2" scored nothing
    assert data[2]["vqa_scores"].tolist() == pytest.approx([0, 0, 1])
    before = AnswerVocabulary(vocabulary.answers, "official_pre2021")
    assert VQAQuestions(held_out, before, "min_n_over_3", LabelledSample(whole_image_transform(
        AugmentSettings(aa=""), 32, False)), "VQA val2014")[2]["vqa_scores"].tolist() == pytest.approx([0, 0, 0])


def test_vqa_mistakes_are_one_sentence(vqa_root, tmp_path):
    with pytest.raises(UserError, match="no v2_OpenEnded_mscoco_val2015_questions.json"):
        read_vqa_split(vqa_root, "val2015", need_answers=True)
    with pytest.raises(UserError, match="no v2_mscoco_test-dev2015_annotations.json.*--eval"):
        vqa_splits(vqa_root, ["train2014"], "test-dev2015", 10, evaluate_only=False)
    assert len(vqa_splits(vqa_root, ["train2014"], "test-dev2015", 10, evaluate_only=True)[1]) == 1
    broken = tmp_path / "broken"
    (broken / "questions").mkdir(parents=True)
    (broken / "questions" / "v2_OpenEnded_mscoco_train2014_questions.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        read_vqa_split(broken, "train2014", need_answers=False)
    for image in (vqa_root / "train2014").iterdir():
        image.unlink()
    with pytest.raises(UserError, match="none of the first 2 images of VQA train2014 could be read"):
        VQAQuestions(read_vqa_split(vqa_root, "train2014", True), AnswerVocabulary(["yes"]), "min_n_over_3",
                     lambda image, index: {}, "VQA train2014")


def write_nlvr2(root, split: str, records: list, images: bool = True):
    """NLVR2's JSON Lines file and its image pairs: train in images/train/<directory>/, dev in dev/."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / f"{split}.json").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records))
    for r in records:
        if not isinstance(r, dict) or not images:
            continue
        stem = r["identifier"].rsplit("-", 1)[0]
        folder = root / "images" / split / str(r["directory"]) if "directory" in r else root / split
        folder.mkdir(parents=True, exist_ok=True)
        for side in (0, 1):
            Image.new("RGB", (30, 20), (side * 200, 50, 50)).save(folder / f"{stem}-img{side}.png")


def test_nlvr2_statements_are_read_with_their_image_pairs(tmp_path):
    write_nlvr2(tmp_path, "train", [
        {"identifier": "train-10171-0-0", "directory": 27, "sentence": "One image has dogs.", "label": "True"},
        {"identifier": "train-10171-0-1", "directory": 27, "sentence": "Both are empty.", "label": "False"},
        "{not json", {"identifier": "train-5-1-0", "sentence": "no label"}])
    write_nlvr2(tmp_path, "dev", [{"identifier": "dev-850-0-0", "sentence": "A cat.", "label": "False"}])
    train = read_nlvr2_split(tmp_path, "train")
    assert [(s.sentence, s.label) for s in train] == [("One image has dogs.", 1), ("Both are empty.", 0)]
    assert train[0].images == (tmp_path / "images/train/27/train-10171-0-img0.png",
                               tmp_path / "images/train/27/train-10171-0-img1.png")
    dev = read_nlvr2_split(tmp_path, "dev")
    assert dev[0].images[1] == tmp_path / "dev" / "dev-850-0-img1.png"
    sample = StatementPairs(dev, lambda image, index: {"image": image}, "NLVR2 dev")[0]
    assert sample["image"].getpixel((0, 0))[0] == 0 and sample["image_2"].getpixel((0, 0))[0] == 200  # left, right
    assert sample["label"] == 0 and sample["caption"] == "A cat."


def test_nlvr2_mistakes_are_one_sentence(tmp_path):
    with pytest.raises(UserError, match="no test1.json there or in data/"):
        read_nlvr2_split(tmp_path, "test1")
    write_nlvr2(tmp_path, "dev", ["{}", "[1]"])
    with pytest.raises(UserError, match="none of its 2 lines is an NLVR2 statement"):
        read_nlvr2_split(tmp_path, "dev")
    write_nlvr2(tmp_path, "dev", [{"identifier": "dev-1-0-0", "sentence": "x", "label": "True"}], images=False)
    with pytest.raises(UserError, match="none of the first 1 images of NLVR2 dev could be read"):
        StatementPairs(read_nlvr2_split(tmp_path, "dev"), lambda image, index: {}, "NLVR2 dev")


def test_synthetic_questions_are_answered_by_the_scene():
    world = SyntheticWorld("train", 200, seed=0)
    kinds = Counter()
    for i in range(200):
        scene, rng = world.scene(i), random.Random(i)
        for question, answer, kind in questions_about(scene, rng):
            kinds[kind] += 1
            if question == "how many objects are there?":
                assert answer == str(len(scene.objects))
            if question.startswith("what color is the ") and question != "what color is the background?":
                shape = question.split()[-1].rstrip("?")
                assert [o.color for o in scene.objects if o.shape == shape] == [answer]
            if question.startswith("is there a "):
                assert (answer == "yes") == any(o.shape == question.split()[-1].rstrip("?") for o in scene.objects)
            humans = human_answers(answer, rng)
            assert len(humans) == 10 and humans.count(answer) >= 7
    assert set(kinds) == {"yes/no", "number", "other"}


def test_synthetic_statements_are_true_half_the_time_and_hold_when_true():
    world = SyntheticWorld("train", 800, seed=0)
    truths = []
    for i in range(400):
        left, right = world.scene(2 * i), world.scene(2 * i + 1)
        text, truth = balanced_statement(left, right, random.Random(i))
        truths.append(truth)
        if text == "the left image has more objects than the right image":
            assert truth == (len(left.objects) > len(right.objects))
        if text.startswith("there are"):
            assert truth == (int(text.split()[2]) == len(left.objects) + len(right.objects))
    assert 0.42 < sum(truths) / len(truths) < 0.58
