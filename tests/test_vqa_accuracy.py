"""VQA's official answer normalisation and accuracy, and the answer vocabulary's targets and score
vectors, against hand-computed values."""
from __future__ import annotations

import random

import pytest

from common.vqa_accuracy import CONTRACTIONS, normalize_answer, process_punctuation, vqa_accuracy
from custom_datasets.vqa_data import AnswerVocabulary, VQAQuestion


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_the_ten_answer_score_is_the_leave_one_out_mean(matching, expected):
    """With 3 of 10 humans agreeing: 3 subsets keep 2 of them (2/3), 7 keep all 3 (1): (3*2/3 + 7) / 10 = 0.9."""
    humans = ["2"] * matching + ["3"] * (10 - matching)
    assert vqa_accuracy("2", humans) == pytest.approx(expected)


def test_predictions_are_normalised_as_the_evaluation_does():
    humans = ["2"] * 4 + ["3"] * 6
    assert vqa_accuracy("Two", humans) == 1.0  # number words become digits, case is ignored
    assert vqa_accuracy("the 2.", humans) == 1.0  # articles and a final period go
    assert vqa_accuracy("2 ", humans) == 1.0
    assert normalize_answer("Don't know") == "don't know"
    assert normalize_answer("dont know") == "don't know"  # apostrophes of contractions are restored
    assert CONTRACTIONS["couldnt've"] == CONTRACTIONS["couldn'tve"] == "couldn't've"
    assert "its" not in CONTRACTIONS and "well" not in CONTRACTIONS  # English words stay as they are
    assert normalize_answer("1,000") == "1000"  # a comma between digits drops every punctuation mark
    assert process_punctuation("left-right") == "left right"  # a mark between letters becomes a space
    assert process_punctuation("yes - no") == "yes  no"  # a mark beside a space is removed
    assert normalize_answer("3.5") == "3.5"  # a period before a digit stays


# (prediction, the humans' answers, today's official accuracy, the pre-2021 code's): cases where the
# two rules differ, each checked against GT-Vision-Lab/VQA's vqaEval.py (a013f00, and c4e6a0e before
# the fix) run on it
OFFICIAL_TABLE = [
    ("2", ["2"] * 4 + ["3"] * 6, 1.0, 1.0),
    ("Two", ["two"] * 4 + ["three"] * 6, 1.0, 0.0),  # disagreeing humans' number words become digits too
    ("2", ["two"] * 10, 0.0, 0.0),  # agreeing humans are compared verbatim
    ("two", ["two"] * 10, 1.0, 0.0),  # ... and so is the prediction, now
    ("Yes", ["yes"] * 10, 0.0, 1.0),  # case counts when the humans agree
    ("yes", ["yes"] * 10, 1.0, 1.0),
    ("no", ["No"] * 3 + ["no"] + ["yes"] * 6, 1.0, 0.3),  # disagreeing humans are lower-cased
    ("the dog", ["dog"] * 2 + ["a dog"] * 2 + ["cat"] * 6, 1.0, 0.6),  # ... and lose their articles
    ("yes", ["yes."] * 3 + ["no"] * 7, 0.9, 0.9),  # a final period goes in both
    ("yes.", ["yes"] * 10, 0.0, 1.0),  # not from a prediction when the humans agree
    ("yes\n", ["yes "] * 10, 1.0, 0.0),  # human answers are stripped of whitespace now
    ("dont", ["don't"] * 5 + ["no"] * 5, 1.0, 1.0),
    ("im", ["i'm"] * 3 + ["no"] * 7, 0.0, 0.0),  # the official table's "Im" never matches a lower-cased word
    ("somebody'd", ["somebody'd"] * 2 + ["x"] * 8, 0.6, 0.0),  # the table's odd entry, on both sides now
    ("yes", ["yes"], 0.0, 0.0),  # one human: no other answer to match
    ("0", ["none"] * 3 + ["1"] * 7, 0.9, 0.0),
    ("1,000", ["1000"] * 4 + ["10"] * 6, 1.0, 1.0),  # a comma between digits drops every mark
    ("yes!", ["yes!"] * 3 + ["no"] * 7, 0.9, 0.0),  # "!" becomes a space, then the words are re-joined
]


@pytest.mark.parametrize("prediction, humans, official, pre2021", OFFICIAL_TABLE)
def test_the_official_rules_on_the_cases_that_tell_them_apart(prediction, humans, official, pre2021):
    assert vqa_accuracy(prediction, humans) == pytest.approx(official)
    assert vqa_accuracy(prediction, humans, "official_pre2021") == pytest.approx(pre2021)


def question(answers: list[str]) -> VQAQuestion:
    return VQAQuestion(1, None, "?", tuple(answers))


def test_the_vocabulary_holds_the_most_frequent_normalised_answers():
    questions = [question(["Yes"] * 6 + ["no"] * 4), question(["two"] * 5 + ["no"] * 5), question(["red"] * 10)]
    assert AnswerVocabulary.most_frequent(questions, 3).answers == ["red", "no", "yes"]  # 10, 9, 6 humans
    assert AnswerVocabulary.most_frequent(questions, 9).answers == ["red", "no", "yes", "2"]  # "two" spelled "2"
    tied = [question(["y"] * 5 + ["x"] * 5 + ["the"] * 8)]
    assert AnswerVocabulary.most_frequent(tied, 2).answers == ["x", "y"]  # ties alphabetically; "" never


def test_training_targets_are_soft_scores_of_the_vocabulary_answers():
    vocabulary = AnswerVocabulary(["yes", "no", "2"])
    humans = ["yes"] * 7 + ["no"] * 2 + ["maybe"]
    assert vocabulary.targets(humans, "min_n_over_3") == pytest.approx({0: 1.0, 1: 2 / 3})
    assert vocabulary.targets(humans, "leave_one_out") == pytest.approx({0: 1.0, 1: 0.6})  # VLMo/ViLT's 0.6
    assert vocabulary.targets(["maybe"] * 10, "min_n_over_3") == {}


def test_the_score_vector_gives_each_answer_its_official_accuracy():
    """Fuzzed over messy human answers: the vector the held-out samples carry equals the official
    accuracy of predicting each vocabulary answer, so reading it at the argmax is the VQA accuracy."""
    rng = random.Random(0)
    spellings = ["yes", "Yes", "yes!", "no", "2", "two", "the dog", "dog", "dog.", "red-ish", "red ish", "3.5", "1,000",
                 "1000", "dont know", "don't know", "a cat", "cats"]
    vocabulary = AnswerVocabulary(sorted({normalize_answer(s) for s in spellings}))
    for _ in range(300):
        humans = [rng.choice(spellings) for _ in range(rng.choice((1, 3, 10)))]
        if rng.random() < 0.2:
            humans = [humans[0]] * len(humans)
        scores = vocabulary.accuracies(humans)
        for index, answer in enumerate(vocabulary.answers):
            assert scores.get(index, 0.0) == pytest.approx(vqa_accuracy(answer, humans)), (answer, humans)
