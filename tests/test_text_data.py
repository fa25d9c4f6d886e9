"""Text side: whole-word masking on the real BERT vocabulary, caption readers of every format,
the tokenizer trainer and tokenizer errors."""
from __future__ import annotations

import json
import random

import pytest
import torch

from common.errors import UserError
from custom_datasets.batch import IGNORE_INDEX
from custom_datasets.text_collate import CaptionCollator
from custom_datasets.text_data import CaptionCorpus, read_pairs
from custom_datasets.text_masking import masker_for
from models.text_tokenizer import load_text_tokenizer
from tests.helpers import SHARED, SHARED_DATA, requires_shared
from util.train_text_tokenizer import main as train_tokenizer

BERT = SHARED / "tokenizers" / "bert-base-uncased"
requires_bert = pytest.mark.skipif(not BERT.is_dir(), reason="../shared/tokenizers/bert-base-uncased is not present")


@requires_bert
def test_whole_word_masking_properties_on_the_bert_vocabulary():
    tokenizer = load_text_tokenizer(str(BERT))
    assert len(tokenizer) == 30522
    collate = CaptionCollator(tokenizer, 40, masker_for(tokenizer, 0.15))
    captions = ["an unbelievably photogenic snowboarder jumps over snowdrifts",
                "two dogs play tug-of-war with a rope on the beach", "hi"] * 200
    random.seed(0)
    batch = collate([{"caption": c} for c in captions])
    ids, masked, labels = batch["input_ids"], batch["mlm_input_ids"], batch["mlm_labels"]
    special = torch.tensor(tokenizer.all_special_ids)
    selected = labels != IGNORE_INDEX
    assert not torch.isin(ids[selected], special).any()  # never [CLS], [SEP], [PAD]
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(masked[~selected], ids[~selected])
    enc = tokenizer(captions, padding="longest", truncation=True, max_length=40)
    fractions, mask_share = [], []
    for row in range(len(captions)):
        words = enc.word_ids(row)
        picked = {words[i] for i in range(len(words)) if selected[row, i]}
        for i, word in enumerate(words):  # every piece of a chosen word is chosen
            if word is not None:
                assert bool(selected[row, i]) == (word in picked)
        for word in picked:  # and gets one treatment: all [MASK], or none
            pieces = [i for i, w in enumerate(words) if w == word]
            is_mask = [int(masked[row, i]) == tokenizer.mask_token_id for i in pieces]
            assert all(is_mask) or not any(is_mask)
            mask_share.append(all(is_mask))
        n = sum(w is not None for w in words)
        assert selected[row].sum() >= 1  # even a one-word caption predicts something
        if n >= 10:
            fractions.append(selected[row].sum().item() / n)
    assert 0.10 < sum(fractions) / len(fractions) < 0.25
    assert 0.7 < sum(mask_share) / len(mask_share) < 0.9  # 80% [MASK]


def test_caption_files_of_every_format(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"caption": "one"}, {"caption": ["two", "three"]}]))
    (tmp_path / "b.jsonl").write_text('{"caption": "four"}\n\nnot json\n{"caption": ["five"]}\n')
    (tmp_path / "c.txt").write_text("six\nseven\n")
    corpus = CaptionCorpus([tmp_path / "a.json", tmp_path / "b.jsonl", tmp_path / "c.txt"])
    samples = [corpus[i] for i in range(len(corpus))]
    assert [s["caption"] if s else None for s in samples] == ["one", "two", "three", "four", None, "five", "six", "seven"]
    (tmp_path / "pairs.json").write_text(json.dumps([{"caption": "x", "filename": "img/1.jpg"}]))
    assert read_pairs(tmp_path / "pairs.json", "/data")[0][0].as_posix() == "/data/img/1.jpg"
    for bad, message in [("[1, 2", "is not valid JSON"), ('{"caption": "x"}', "must be a JSON list")]:
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(UserError, match=message):
            CaptionCorpus([tmp_path / "bad.json"])
    with pytest.raises(UserError, match="none of its 2 pairs is usable .each needs a non-empty \"caption\" and a "):
        read_pairs(tmp_path / "a.json", None)
    with pytest.raises(UserError, match="unknown format"):
        CaptionCorpus([tmp_path / "pairs.csv"]) if (tmp_path / "pairs.csv").write_text("x") else None


def test_trained_tokenizer_round_trips_and_bad_tokenizer_paths_are_clear(tmp_path):
    out = train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "300", "--output", str(tmp_path / "tok")])
    tokenizer = load_text_tokenizer(str(out))
    text = "a small red circle at the top left on a gray background"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer.mask_token_id is not None and tokenizer.pad_token_id == 0
    with pytest.raises(UserError, match="has no vocab.txt"):
        load_text_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match="neither a local folder .* nor reachable"):
        load_text_tokenizer("no-such-org/no-such-tokenizer-xyz")


@requires_shared
def test_real_caption_corpora_load():
    corpus = CaptionCorpus([SHARED_DATA / "flickr8k_captions_40k.json", SHARED_DATA / "alt_text_10k.json"])
    assert len(corpus) == 50_455
    pairs = read_pairs(SHARED_DATA / "flickr8k_1k" / "captions.json", None)
    assert len(pairs) == 1000 and len(pairs[0][1]) == 5 and pairs[0][0].is_file()
