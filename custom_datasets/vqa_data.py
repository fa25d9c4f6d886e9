"""VQAv2 as distributed: `v2_OpenEnded_mscoco_<split>_questions.json` and
`v2_mscoco_<split>_annotations.json` (in --data_path or its questions/ or annotations/ folder), and
COCO's images in `<folder>/COCO_<folder>_<12-digit image id>.jpg` (test-dev2015 uses test2015's).
The answer vocabulary is the most frequent human answers of the training questions, spelled as
the evaluation normalises them; a question's training target is a soft score per vocabulary
answer, and its held-out score vector holds the official accuracy each answer would get."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from common.console import say
from common.errors import UserError
from common.vqa_accuracy import (
    accuracy_of_matches,
    answer_counts,
    compared_human_answers,
    compared_prediction,
)
from custom_datasets import batch as B
from custom_datasets.image_io import open_rgb
from custom_datasets.pair_data import require_readable_images

ANSWER_TYPES = ("yes/no", "number", "other")  # the official breakdown; anything else counts as "other"
FILE_FOLDERS = ("", "questions", "annotations", "Questions", "Annotations")


@dataclass(frozen=True)
class VQAQuestion:
    question_id: int
    image: Path
    question: str
    answers: tuple[str, ...]  # the humans' raw answers; () for a split without annotations
    answer_type: str = "other"


def questions_file(split: str) -> str:
    return f"v2_OpenEnded_mscoco_{split}_questions.json"


def annotations_file(split: str) -> str:
    return f"v2_mscoco_{split}_annotations.json"


def image_folder(split: str) -> str:
    return "test2015" if split == "test-dev2015" else split


def find_file(root: Path, name: str) -> Path | None:
    return next((root / sub / name for sub in FILE_FOLDERS if (root / sub / name).is_file()), None)


def read_json_object(path: Path, key: str) -> list:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); download it again from visualqa.org") from None
    if not isinstance(value, dict) or not isinstance(value.get(key), list):
        raise UserError(f"{path} has no \"{key}\" list; is it a VQAv2 {key} file?")
    return value[key]


def read_vqa_split(root: str | Path, split: str, need_answers: bool) -> list[VQAQuestion]:
    """The questions of one split (train2014, val2014, test-dev2015, ...), with their human answers
    when the split has annotations; malformed entries are skipped and counted."""
    root = Path(root)
    questions_path = find_file(root, questions_file(split))
    if questions_path is None:
        raise UserError(f"--data_path {root}: no {questions_file(split)} there or in its questions/ folder; "
                        f"download VQAv2's questions for {split}, or choose another split")
    annotations_path = find_file(root, annotations_file(split))
    if annotations_path is None and need_answers:
        raise UserError(f"--data_path {root}: no {annotations_file(split)}, so {split} cannot be trained or scored; "
                        f"add it, or evaluate with --eval to write answers only")
    annotations = {}
    if annotations_path is not None:
        for entry in read_json_object(annotations_path, "annotations"):
            answers = entry.get("answers") if isinstance(entry, dict) else None
            if isinstance(answers, list) and all(isinstance(a, dict) and isinstance(a.get("answer"), str)
                                                 for a in answers) and answers:
                annotations[entry.get("question_id")] = entry
    folder = root / image_folder(split)
    entries = read_json_object(questions_path, "questions")
    questions = []
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("question"), str)
                and isinstance(entry.get("question_id"), int) and isinstance(entry.get("image_id"), int)):
            continue
        note = annotations.get(entry["question_id"])
        if annotations_path is not None and note is None:
            continue
        answers = tuple(a["answer"] for a in note["answers"]) if note else ()
        kind = note.get("answer_type") if note else None
        image = folder / f"COCO_{image_folder(split)}_{entry['image_id']:012d}.jpg"
        questions.append(VQAQuestion(entry["question_id"], image, entry["question"], answers,
                                     kind if kind in ANSWER_TYPES else "other"))
    skipped = len(entries) - len(questions)
    if not questions:
        raise UserError(f"{questions_path}: none of its {len(entries)} questions is usable (each needs question, "
                        f"question_id and image_id, and an annotation with answers); check the files")
    if skipped:
        say(f"{questions_path}: skipped {skipped} of {len(entries)} questions (malformed, or without annotation)")
    return questions


class AnswerVocabulary:
    """The answers a VQA classifier chooses from, normalised as the evaluation compares them."""

    def __init__(self, answers: Sequence[str], scoring: str = "official") -> None:
        self.answers = list(answers)
        self.scoring = scoring
        self.index = {a: i for i, a in enumerate(self.answers)}
        # each answer as the evaluation compares a prediction: normalised (humans who disagree) or
        # only stripped (humans who agree, under today's official rule)
        self.by_compared: dict[bool, dict[str, list[int]]] = {True: {}, False: {}}
        for i, answer in enumerate(self.answers):
            for normalised, table in self.by_compared.items():
                table.setdefault(compared_prediction(answer, normalised), []).append(i)

    @classmethod
    def most_frequent(cls, questions: Sequence[VQAQuestion], size: int, scoring: str = "official") -> "AnswerVocabulary":
        """The `size` answers the humans gave most often (ties in alphabetical order)."""
        counts = Counter()
        for q in questions:
            counts.update(answer_counts(q.answers))
        counts.pop("", None)  # an answer that normalises to nothing ("the") is no answer
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls([answer for answer, _ in ranked[:size]], scoring)

    def __len__(self) -> int:
        return len(self.answers)

    def targets(self, human_answers: Sequence[str], soft_score: str) -> dict[int, float]:
        """Training targets: `{vocabulary index: score}` for the answers the humans gave, min(1, n/3)
        or (VLMo/ViLT) the official leave-one-out accuracy of n matching humans."""
        total = len(human_answers)
        scores = {}
        for answer, n in answer_counts(human_answers).items():
            if answer in self.index:
                scores[self.index[answer]] = min(1.0, n / 3) if soft_score == "min_n_over_3" else \
                    accuracy_of_matches(n, total)
        return scores

    def accuracies(self, human_answers: Sequence[str]) -> dict[int, float]:
        """`{vocabulary index: the official accuracy of answering it}`, for every answer that scores."""
        compared, normalised = compared_human_answers(human_answers, self.scoring)
        table = self.by_compared[normalised]
        return {i: accuracy_of_matches(compared.count(value), len(compared))
                for value in set(compared) for i in table.get(value, [])}


def dense(scores: dict[int, float], size: int) -> torch.Tensor:
    vector = torch.zeros(size)
    for index, value in scores.items():
        vector[index] = value
    return vector


class VQAQuestions(Dataset):
    """A sample: `build(image) | {"caption": question, "vqa_targets", "vqa_scores": [answers],
    "question_id", "answer_type"}` (no scores for a split without annotations); None when its image
    cannot be read."""

    def __init__(self, questions: list[VQAQuestion], vocabulary: AnswerVocabulary, soft_score: str,
                 build: Callable[..., dict[str, Any]], what: str) -> None:
        self.questions, self.vocabulary, self.soft_score, self.build = questions, vocabulary, soft_score, build
        self.annotated = bool(questions and questions[0].answers)
        require_readable_images(list(dict.fromkeys(q.image for q in questions[:40]))[:20], what,
                                "check --data_path: COCO's images go in train2014/, val2014/ and test2015/ there")

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        q = self.questions[index]
        try:
            image = open_rgb(q.image)
        except Exception:  # noqa: BLE001 - missing/corrupt images are skipped and counted
            return None
        sample = {**self.build(image, index), B.CAPTION: q.question, B.QUESTION_ID: q.question_id,
                  B.ANSWER_TYPE: ANSWER_TYPES.index(q.answer_type)}
        if self.annotated:
            size = len(self.vocabulary)
            sample[B.VQA_TARGETS] = dense(self.vocabulary.targets(q.answers, self.soft_score), size)
            sample[B.VQA_SCORES] = dense(self.vocabulary.accuracies(q.answers), size)
        return sample


def vqa_splits(root: str | Path, train_splits: Sequence[str], eval_split: str, vocabulary_size: int,
               evaluate_only: bool, recorded_answers: Sequence[str] | None = None, scoring: str = "official"):
    """(training questions that have an answer in the vocabulary, held-out questions, vocabulary).
    `recorded_answers`: the vocabulary a VQA checkpoint was trained with (kept, so its classifier's
    outputs mean the same answers); `scoring`: the official rule held-out answers are scored by."""
    train = [q for split in train_splits for q in read_vqa_split(root, split, need_answers=True)] \
        if not (evaluate_only and recorded_answers) else []
    held_out = read_vqa_split(root, eval_split, need_answers=not evaluate_only)
    if recorded_answers:
        vocabulary = AnswerVocabulary(recorded_answers, scoring)
    else:
        vocabulary = AnswerVocabulary.most_frequent(train, vocabulary_size, scoring)
    answerable = [q for q in train if vocabulary.targets(q.answers, "min_n_over_3")]
    if train and len(answerable) < len(train):
        say(f"VQA: {len(train) - len(answerable)} of {len(train)} training questions have no answer among the "
            f"{len(vocabulary)} of the vocabulary and are left out of training (held-out questions like them still count "
            f"in evaluation, where no answer can score)")
    return answerable, held_out, vocabulary
