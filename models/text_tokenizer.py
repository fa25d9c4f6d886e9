"""The text tokenizer: a BERT WordPiece tokenizer (Hugging Face) from a local folder or the hub.

`bert-base-uncased` (30,522 tokens) is what BEiT/VLMo text weights expect; a folder written by
`util/train_text_tokenizer.py` works the same way offline."""
from __future__ import annotations

import json
from pathlib import Path

from common.errors import UserError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


LOCAL_FOLDER = Path("checkpoints")  # hub names are looked up here first (checkpoints/bert-base-uncased/)


def load_text_tokenizer(name_or_dir: str):
    """A fast BERT tokenizer (with `word_ids`, which whole-word masking needs): a folder, or a hub
    name found in checkpoints/<name>/, the hub cache or the hub."""
    from transformers import BertTokenizerFast

    path = Path(name_or_dir)
    if not path.exists() and (LOCAL_FOLDER / name_or_dir / "vocab.txt").is_file():
        path = LOCAL_FOLDER / name_or_dir
    if path.exists():
        if not (path / "vocab.txt").is_file():
            raise UserError(f"--tokenizer {name_or_dir} has no vocab.txt; pass a BERT tokenizer folder or train one: "
                            f"python util/train_text_tokenizer.py --data_file_path CAPTIONS.json --output {name_or_dir}")
        tokenizer = BertTokenizerFast.from_pretrained(str(path))
        if not _has_vocabulary(tokenizer):
            raise UserError(f"--tokenizer {name_or_dir}: vocab.txt holds no vocabulary; re-create the folder")
        return tokenizer
    try:
        tokenizer = BertTokenizerFast.from_pretrained(name_or_dir, local_files_only=True)  # the hub cache
        if _has_vocabulary(tokenizer):
            return tokenizer
    except Exception:  # noqa: BLE001 - not cached: try the hub below
        pass
    reason = "the hub cannot be reached from this machine"
    if _hub_reachable():
        try:
            tokenizer = BertTokenizerFast.from_pretrained(name_or_dir)
            if _has_vocabulary(tokenizer):
                return tokenizer
            reason = "it has no vocabulary"
        except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear sentence
            reason = str(err).splitlines()[0][:120]
    raise UserError(f"--tokenizer {name_or_dir} is neither a local folder (nor checkpoints/{name_or_dir}/) nor "
                    f"reachable on the Hugging Face hub ({reason}); put its vocab.txt in checkpoints/{name_or_dir}/, "
                    f"pass a local folder, or train one with util/train_text_tokenizer.py")


def _has_vocabulary(tokenizer) -> bool:
    """transformers 5 silently builds an empty tokenizer (special tokens only) when files are missing."""
    return len(tokenizer) > len(SPECIAL_TOKENS)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick check, so an offline machine fails at once instead of after minutes of retries."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def train_wordpiece(texts, vocab_size: int, output_dir: str | Path, lowercase: bool = True):
    """Fit a BERT WordPiece vocabulary on `texts` and save it as a tokenizer folder; returns the tokenizer."""
    from tokenizers import BertWordPieceTokenizer

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase)
    trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL_TOKENS))
    trainer.save_model(str(output_dir))  # vocab.txt
    write_tokenizer_config(output_dir, lowercase)
    return load_text_tokenizer(str(output_dir))


def write_tokenizer_config(folder: Path, lowercase: bool) -> None:
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "strip_accents": None if lowercase else False,
              "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
              "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def write_tokenizer_folder(folder: str | Path, vocab: list[str], lowercase: bool) -> None:
    """A BERT tokenizer folder (vocab.txt in id order + tokenizer_config.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    write_tokenizer_config(folder, lowercase)
