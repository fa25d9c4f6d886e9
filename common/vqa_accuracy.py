"""VQA's official answer normalisation and accuracy (GT-Vision-Lab/VQA's `vqaEval.py`, re-implemented
as it stands since its 2021 fix "Fixed processing answers bug"): a predicted answer scores the mean,
over the ten ways of leaving one human answer out, of min(1, matching answers among the other nine
/ 3), i.e. 0, 0.3, 0.6, 0.9 or 1 for 0, 1, 2, 3 or 4+ matching humans.

Which spellings match (`RULES`):
- `official` (today's code): newlines and tabs become spaces and the ends are stripped, for the
  prediction and every human answer; when the humans disagree, both are then normalised fully
  (punctuation, lower case, number words to digits, articles dropped, contractions restored); when
  they all agree, neither is, so "Yes" does not match ten humans' "yes";
- `official_pre2021` (the code before the fix, what the VQA papers of 2016-2020 were scored with):
  the prediction is always normalised fully, the human answers only have their punctuation
  processed, and only when they disagree.
The period rule runs at most 32 times in both (the official code passes re.UNICODE as the count)."""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

RULES = ("official", "official_pre2021")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, (?!<= and all: a period not before a digit
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# The official contraction table, grouped by the form it restores: {restored: "typed spellings"}.
# Only lower-case spellings are listed: the official lookup happens after lower-casing, so its
# "Im", "Ive", "Id've" and "I'dve" never match, and its "let's" and "she's" map to themselves. Its
# one odd entry is kept as it is: "somebody'd" becomes "somebodyd".
RESTORED = {
    "ain't": "aint", "aren't": "arent", "can't": "cant", "could've": "couldve", "couldn't": "couldnt",
    "couldn't've": "couldn'tve couldnt've", "didn't": "didnt", "doesn't": "doesnt", "don't": "dont",
    "hadn't": "hadnt", "hadn't've": "hadnt've hadn'tve", "hasn't": "hasnt", "haven't": "havent", "he'd": "hed",
    "he'd've": "hed've he'dve", "he's": "hes", "how'd": "howd", "how'll": "howll", "how's": "hows", "isn't": "isnt",
    "it'd": "itd", "it'd've": "itd've it'dve", "it'll": "itll", "ma'am": "maam", "mightn't": "mightnt",
    "mightn't've": "mightnt've mightn'tve", "might've": "mightve", "mustn't": "mustnt", "must've": "mustve",
    "needn't": "neednt", "not've": "notve", "o'clock": "oclock", "oughtn't": "oughtnt",
    "'ow's'at": "ow's'at 'ows'at 'ow'sat", "shan't": "shant", "she'd've": "shed've she'dve", "should've": "shouldve",
    "shouldn't": "shouldnt", "shouldn't've": "shouldnt've shouldn'tve", "somebodyd": "somebody'd",
    "somebody'd've": "somebodyd've somebody'dve", "somebody'll": "somebodyll", "somebody's": "somebodys",
    "someone'd": "someoned", "someone'd've": "someoned've someone'dve", "someone'll": "someonell",
    "someone's": "someones", "something'd": "somethingd", "something'd've": "somethingd've something'dve",
    "something'll": "somethingll", "that's": "thats", "there'd": "thered", "there'd've": "thered've there'dve",
    "there're": "therere", "there's": "theres", "they'd": "theyd", "they'd've": "theyd've they'dve",
    "they'll": "theyll", "they're": "theyre", "they've": "theyve", "'twas": "twas", "wasn't": "wasnt",
    "we'd've": "wed've we'dve", "we've": "weve", "weren't": "werent", "what'll": "whatll", "what're": "whatre",
    "what's": "whats", "what've": "whatve", "when's": "whens", "where'd": "whered", "where's": "wheres",
    "where've": "whereve", "who'd": "whod", "who'd've": "whod've who'dve", "who'll": "wholl", "who's": "whos",
    "who've": "whove", "why'll": "whyll", "why're": "whyre", "why's": "whys", "won't": "wont",
    "would've": "wouldve", "wouldn't": "wouldnt", "wouldn't've": "wouldnt've wouldn'tve", "y'all": "yall",
    "y'all'll": "yall'll y'allll", "y'all'd've": "yall'd've y'alld've y'all'dve", "you'd": "youd",
    "you'd've": "youd've you'dve", "you'll": "youll", "you're": "youre", "you've": "youve",
}
CONTRACTIONS = {typed: restored for restored, spellings in RESTORED.items() for typed in spellings.split()}


def strip_whitespace(text: str) -> str:
    """What the official code does to every answer first: newlines and tabs to spaces, ends stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


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
    """An answer normalised fully (how the answer vocabulary is spelled, and what a prediction is
    compared as when the humans disagree)."""
    return process_digit_article(process_punctuation(strip_whitespace(answer)))


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown VQA scoring rule {rule!r}; choose one of {', '.join(RULES)}")


def compared_human_answers(human_answers: Sequence[str], rule: str = "official") -> tuple[list[str], bool]:
    """The human answers as the evaluation compares them, and whether the prediction is normalised
    fully before it is compared with them."""
    check_rule(rule)
    if rule == "official":
        stripped = [strip_whitespace(a) for a in human_answers]
        if len(set(stripped)) > 1:
            return [process_digit_article(process_punctuation(a)) for a in stripped], True
        return stripped, False
    if len(set(human_answers)) > 1:
        return [process_punctuation(a) for a in human_answers], True
    return list(human_answers), True


def compared_prediction(prediction: str, normalised: bool) -> str:
    return normalize_answer(prediction) if normalised else strip_whitespace(prediction)


def accuracy_of_matches(matches: int, total: int) -> float:
    """Mean over the `total` leave-one-out subsets of min(1, matches among the others / 3)."""
    if total == 0:
        return 0.0
    return (matches * min(1.0, (matches - 1) / 3) + (total - matches) * min(1.0, matches / 3)) / total


def vqa_accuracy(prediction: str, human_answers: Sequence[str], rule: str = "official") -> float:
    """The official accuracy of one predicted answer against the humans' (usually ten)."""
    compared, normalised = compared_human_answers(human_answers, rule)
    return accuracy_of_matches(compared.count(compared_prediction(prediction, normalised)), len(compared))


def answer_counts(human_answers: Sequence[str]) -> Counter:
    """How many humans gave each answer, spelled as the vocabulary spells answers."""
    return Counter(normalize_answer(a) for a in human_answers)
