"""Karpathy's COCO and Flickr30k split files, in the layout they are distributed in (fixtures
written here): training reads train + restval, evaluation test (or val), image paths follow
`filepath` when there is one, every sentence is a caption, and broken entries are skipped and
counted."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from common.errors import UserError
from custom_datasets.downstream_data import train_and_held_out_pairs
from custom_datasets.karpathy_split import is_karpathy_file, read_karpathy
from custom_datasets.settings import FinetuneDataSettings


def coco_split(root):
    entries = []
    for i, split in enumerate(["train", "restval", "val", "test", "test", "train"]):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        (root / folder).mkdir(parents=True, exist_ok=True)
        name = f"COCO_{folder}_{i:012d}.jpg"
        Image.new("RGB", (24, 24), (i * 40, 0, 0)).save(root / folder / name)
        entries.append({"filepath": folder, "filename": name, "split": split, "imgid": i, "cocoid": i,
                        "sentids": [5 * i + k for k in range(5)],
                        "sentences": [{"raw": f"Image {i}, caption {k}.", "tokens": ["image"], "imgid": i,
                                       "sentid": 5 * i + k} for k in range(5)]})
    entries.append({"filepath": "val2014", "filename": "no_sentences.jpg", "split": "test", "sentences": []})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


def test_coco_train_takes_train_and_restval_and_evaluation_takes_test(tmp_path):
    path = coco_split(tmp_path)
    assert is_karpathy_file(path)
    train, held_out = train_and_held_out_pairs(FinetuneDataSettings(data_file_path=str(path), data_path=str(tmp_path)))
    assert [p.name for p, _ in train] == ["COCO_train2014_000000000000.jpg", "COCO_train2014_000000000001.jpg",
                                          "COCO_train2014_000000000005.jpg"]
    assert [p.parent.name for p, _ in held_out] == ["val2014", "val2014"] and len(held_out) == 2  # one skipped
    assert held_out[0][1] == [f"Image 3, caption {k}." for k in range(5)]
    assert all(p.is_file() for p, _ in train + held_out)
    _, val = train_and_held_out_pairs(FinetuneDataSettings(data_file_path=str(path), data_path=str(tmp_path),
                                                           karpathy_eval_split="val"))
    assert [p.name for p, _ in val] == ["COCO_val2014_000000000002.jpg"]


def test_flickr30k_paths_have_no_filepath(tmp_path):
    entries = [{"filename": f"{i}.jpg", "split": s, "sentences": [{"raw": "a dog"}, {"raw": "a dog runs"}]}
               for i, s in enumerate(["train", "test"])]
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    pairs = read_karpathy(path, tmp_path / "flickr30k-images", ("test",))
    assert pairs == [(tmp_path / "flickr30k-images" / "1.jpg", ["a dog", "a dog runs"])]


def test_a_pair_list_is_not_taken_for_a_split_file_and_bad_files_are_one_sentence(tmp_path):
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"filename": "a.jpg", "caption": "x"}]))
    assert not is_karpathy_file(pairs)
    broken = tmp_path / "dataset_coco.json"
    broken.write_text('{"images": [{"filename": "a.jpg", "split": "test"}]}')
    with pytest.raises(UserError, match="none of its 1 images is usable"):
        read_karpathy(broken, tmp_path, ("test",))
