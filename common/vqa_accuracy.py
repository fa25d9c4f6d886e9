"""VQA's official answer normalisation and accuracy (the VQA challenge's evaluation, re-implemented):
a predicted answer scores the mean, over the ten ways of leaving one human answer out, of
min(1, matching answers among the other nine / 3), i.e. 0, 0.3, 0.6, 0.9 or 1 for 0, 1, 2, 3 or
4+ matching humans. Its quirks are kept on purpose so numbers match the server: the prediction is
normalised fully, the human answers only have their punctuation processed and only when they
disagree, and the period rule runs at most 32 times (the official code passes re.UNICODE as the
count)."""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, (?!<= and all: a period not before a digit
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# Contractions as people type them without apostrophes are restored. Written as the correct forms;
# every spelling that drops some of the apostrophes maps to them. Words that are English without
# the apostrophe (its, well, were, shed, ill, hell, lets, id, wed) are left alone, as officially.
CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've "
    "who'd who'd've who'll who're who's who've why'll why're why's won't would've wouldn't wouldn't've y'all "
    "y'all'll y'all'd've you'd you'd've you'll you're you've").split()
ENGLISH_WITHOUT_APOSTROPHE = frozenset({"its", "well", "were", "shed", "ill", "hell", "lets", "id", "wed", "shell"})


def _apostrophe_variants(word: str) -> list[str]:
    """Every spelling of `word` with a non-empty subset of its apostrophes dropped."""
    spots = [i for i, ch in enumerate(word) if ch == "'"]
    variants = []
    for subset in range(1, 2 ** len(spots)):
        dropped = {spots[b] for b in range(len(spots)) if subset >> b & 1}
        variants.append("".join(ch for i, ch in enumerate(word) if i not in dropped))
    return variants


CONTRACTIONS = {variant: word for word in CONTRACTED for variant in _apostrophe_variants(word)
                if variant not in ENGLISH_WITHOUT_APOSTROPHE}


def process_punctuation(text: str) -> str:
    """Each punctuation mark is removed where it touches a space (or the text has a comma between
    digits), else replaced by a space; then periods not followed by a digit go."""
    out = text
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    """Lower case, number words to digits, articles dropped, apostrophes of contractions restored."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """What the evaluation compares a prediction as (also how the answer vocabulary is spelled)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def compared_human_answers(human_answers: Sequence[str]) -> list[str]:
    """The human answers as the evaluation compares them: punctuation processed only when they
    disagree (the official rule)."""
    if len(set(human_answers)) > 1:
        return [process_punctuation(a) for a in human_answers]
    return list(human_answers)


def accuracy_of_matches(matches: int, total: int) -> float:
    """Mean over the `total` leave-one-out subsets of min(1, matches among the others / 3)."""
    if total == 0:
        return 0.0
    return (matches * min(1.0, (matches - 1) / 3) + (total - matches) * min(1.0, matches / 3)) / total


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The official accuracy of one predicted answer against the humans' (usually ten)."""
    compared = compared_human_answers(human_answers)
    return accuracy_of_matches(compared.count(normalize_answer(prediction)), len(compared))


def answer_counts(human_answers: Sequence[str]) -> Counter:
    """How many humans gave each answer, spelled as the vocabulary spells answers."""
    return Counter(normalize_answer(a) for a in human_answers)
