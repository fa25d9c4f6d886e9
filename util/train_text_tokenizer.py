"""Train a BERT WordPiece vocabulary on your own captions (seconds), for offline use and for new
languages or domains; the result is a tokenizer folder for `--tokenizer DIR`.

    python util/train_text_tokenizer.py --data_file_path captions.json --vocab_size 8000 --output checkpoints/my_tok
    python util/train_text_tokenizer.py --data_file_path synthetic --vocab_size 512 --output outputs/demo_tokenizer
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import UserError, cli_entry  # noqa: E402
from custom_datasets.pair_data import caption_texts  # noqa: E402
from models.text_tokenizer import train_wordpiece  # noqa: E402


@cli_entry
def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_file_path", nargs="+", required=True, help="caption files (.json/.jsonl/.txt) or 'synthetic'")
    p.add_argument("--vocab_size", type=int, default=8000)
    p.add_argument("--output", required=True, help="folder to write vocab.txt and tokenizer_config.json into")
    p.add_argument("--cased", action="store_true", help="keep case and accents (default: lowercase, as bert-base-uncased)")
    p.add_argument("--synthetic_size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    output = Path(args.output)
    if (output / "vocab.txt").exists() and not args.overwrite:
        raise UserError(f"--output {output} already holds a vocab.txt; pass --overwrite or choose another folder")
    if args.vocab_size < 16:
        raise UserError("--vocab_size must be at least 16 (the special tokens and some characters)")
    start = time.time()
    tokenizer = train_wordpiece(caption_texts(args.data_file_path, args.synthetic_size, args.seed), args.vocab_size,
                                output, lowercase=not args.cased)
    print(f"saved a {len(tokenizer)}-token WordPiece tokenizer to {output} ({time.time() - start:.1f}s); "
          f"use it with --tokenizer {output}")
    return output


if __name__ == "__main__":
    main()
