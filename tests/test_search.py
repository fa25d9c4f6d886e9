"""util/search.py: text -> images over a cached folder, image -> captions, and clear errors."""
from __future__ import annotations

import json

import pytest

from custom_datasets.synthetic_world import SyntheticWorld
from main_pretrain_cook import main as pretrain
from tests.test_pretrain_cli import SYNTH, TINY, TINY_BASE
from util.search import main as search
from util.train_text_tokenizer import main as train_tokenizer


def test_search_both_directions_with_a_cache(tmp_path):
    tok = train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "200", "--output", str(tmp_path / "tok")])
    pretrain(TINY_BASE + SYNTH + ["--exp_name", "image_text_itc", "--tokenizer", str(tok), "--epochs", "1", "--output_dir",
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


def test_search_from_a_merged_file_or_its_onnx_export_alone(tmp_path):
    """No --tokenizer, no flags about preprocessing: the merged file and the export describe themselves."""
    from util.export import main as export

    tok = train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "200", "--output", str(tmp_path / "tok")])
    pretrain(TINY_BASE + SYNTH + ["--exp_name", "image_text_itc", "--tokenizer", str(tok), "--epochs", "1",
                             "--imagenet_default_mean_and_std", "--output_dir", str(tmp_path / "itc")])
    pretrain(TINY_BASE + SYNTH + ["--exp_name", "image_text_itc", "--tokenizer", str(tok), "--epochs", "1", "--lora_rank", "4",
                             "--init_from", str(tmp_path / "itc" / "checkpoint-0.pth"), "--save_merged_lora_model",
                             "--imagenet_default_mean_and_std", "--output_dir", str(tmp_path / "lora")])
    merged = tmp_path / "lora" / "merged_model.safetensors"
    images = tmp_path / "images"
    images.mkdir()
    world = SyntheticWorld("val", 5, seed=0, render_size=32)
    for i in range(5):
        world[i]["image"].save(images / f"{i}.png")
    query = world[2]["caption"]
    from_file = search(["--checkpoint", str(merged), "--images", str(images), "--query", query, "--topk", "5",
                        "--cache_dir", str(tmp_path / "c1")])[query]
    export(["--checkpoint", str(merged), "--format", "onnx", "--output", str(tmp_path / "onnx")])
    info = json.loads((tmp_path / "onnx" / "run_info.json").read_text())
    assert info["preprocessing"]["mean"] == [0.485, 0.456, 0.406] and info["text_tokenizer"]["name"] == str(tok)
    from_export = search(["--checkpoint", str(tmp_path / "onnx"), "--images", str(images), "--query", query, "--topk",
                          "5", "--cache_dir", str(tmp_path / "c2")])[query]
    assert [h["image"] for h in from_export] == [h["image"] for h in from_file]
    assert [h["score"] for h in from_export] == pytest.approx([h["score"] for h in from_file], abs=1e-3)
