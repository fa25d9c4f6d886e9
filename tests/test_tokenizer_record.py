"""A checkpoint's embedded text vocabulary rebuilds its tokenizer without leaving files behind."""
import tempfile
from pathlib import Path

from models.run_info import text_tokenizer_record, tokenizer_from_record

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s"]


def leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("cook-tokenizer-*")}


def test_rebuilt_tokenizer_round_trips_and_leaves_no_temp_folder():
    before = leftovers()
    tokenizer = tokenizer_from_record({"name": "tiny", "vocab": VOCAB, "lowercase": True})
    assert leftovers() == before
    ids = tokenizer("A red circles")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "a", "red", "circle", "##s", "[SEP]"]
    assert text_tokenizer_record(tokenizer, "tiny")["vocab"] == VOCAB
