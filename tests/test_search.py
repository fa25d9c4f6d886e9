"""util/search.py: text -> images over a cached folder, image -> captions, and clear errors."""
from __future__ import annotations

import json

import pytest

from custom_datasets.synthetic_world import SyntheticWorld
from main_pretrain_cook import main as pretrain
from tests.test_pretrain_cli import SYNTH, TINY
from util.search import main as search
from util.train_text_tokenizer import main as train_tokenizer


def test_search_both_directions_with_a_cache(tmp_path):
    tok = train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "200", "--output", str(tmp_path / "tok")])
    pretrain(TINY + SYNTH + ["--exp_name", "image_text_itc", "--tokenizer", str(tok), "--epochs", "1", "--output_dir",
                             str(tmp_path / "itc")])
    ckpt = str(tmp_path / "itc" / "checkpoint-0.pth")
    images = tmp_path / "images"
    images.mkdir()
    world = SyntheticWorld("val", 6, seed=0, render_size=32)
    for i in range(6):
        world[i]["image"].save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"nope")
    cache = tmp_path / "cache"
    first = search(["--checkpoint", ckpt, "--images", str(images), "--query", world[0]["caption"], "--topk", "3",
                    "--cache_dir", str(cache)])
    hits = first[world[0]["caption"]]
    assert len(hits) == 3 and all(h["image"].endswith(".png") and "broken" not in h["image"] for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert len(list(cache.glob("*.safetensors"))) == 1
    again = search(["--checkpoint", ckpt, "--images", str(images), "--query", world[0]["caption"], "--topk", "3",
                    "--cache_dir", str(cache)])  # served from the cache, same answer
    assert again == first
    (tmp_path / "caps.json").write_text(json.dumps([{"caption": world[i]["caption"]} for i in range(6)]))
    reverse = search(["--checkpoint", ckpt, "--image_query", str(images / "0.png"), "--captions", str(tmp_path / "caps.json"),
                      "--topk", "2"])
    assert len(reverse[str(images / "0.png")]) == 2
    pretrain(TINY + SYNTH + ["--epochs", "1", "--output_dir", str(tmp_path / "mim")])
    with pytest.raises(SystemExit):  # no ITC head
        search(["--checkpoint", str(tmp_path / "mim" / "checkpoint-0.pth"), "--images", str(images), "--query", "x"])
