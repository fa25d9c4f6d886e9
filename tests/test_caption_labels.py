"""util/caption_labels.py: classes voted by captions, ambiguous images left out, a split that does not
move when images are added, and refusals in one sentence."""
from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from common.errors import UserError
from custom_datasets.text_data import read_pairs
from util import caption_labels

DOG, PERSON = "dog=dog,dogs,puppy", "person=man,woman,child"


def write_pairs(root, captions: dict[str, list[str]]):
    (root / "images").mkdir(parents=True)
    for name in captions:
        Image.new("RGB", (8, 8), (len(name) * 10, 0, 0)).save(root / "images" / name)
    path = root / "captions.json"
    path.write_text(json.dumps([{"filename": f"images/{n}", "caption": c} for n, c in captions.items()]))
    return path


def test_labels_follow_caption_votes_and_ambiguous_images_are_left_out():
    classes = caption_labels.word_patterns([DOG, PERSON])
    assert caption_labels.label(["A dog runs", "a brown DOG", "Dogs play", "a field"], classes, 3, 1) == "dog"
    assert caption_labels.label(["a dog", "a dog", "a field", "grass"], classes, 3, 1) is None  # 2 votes < 3
    assert caption_labels.label(["a man and his dog"] * 3, classes, 3, 1) is None  # both classes named 3 times
    assert caption_labels.label(["a dog", "a dog", "a dog", "a man with a dog"], classes, 3, 1) == "dog"  # 1 other
    assert caption_labels.label(["hotdog stand", "doghouse", "dogma", "x"], classes, 1, 1) is None  # whole words


def test_the_folder_it_writes_is_split_by_name_and_lists_its_val_images(tmp_path):
    captions = {f"dog{i}.png": ["a dog"] * 3 for i in range(30)}
    captions |= {f"kid{i}.png": ["a child plays"] * 3 for i in range(30)}
    captions |= {"both.png": ["a child and a dog"] * 3}
    pairs = write_pairs(tmp_path / "data", captions)
    out = tmp_path / "labelled"
    counts = caption_labels.main(["--captions", str(pairs), "--class", DOG, "--class", PERSON, "--output", str(out)])
    train = {p.name for p in (out / "train").rglob("*.png")}
    val = {p.name for p in (out / "val").rglob("*.png")}
    assert not train & val and len(train | val) == 60 and "both.png" not in train | val
    assert sum(counts["val"].values()) == len(val) and 10 <= len(val) <= 30  # a third, by hash
    assert {p.name for p in (out / "val" / "dog").iterdir()} <= {n for n in captions if n.startswith("dog")}
    listed = (out / "val_images.txt").read_text().split()
    assert sorted(p.rsplit("/", 1)[-1] for p in listed) == sorted(val)
    kept = read_pairs(out / "pairs_without_val.json", tmp_path / "data")  # every pair but the val images'
    assert sorted(image.name for image, _ in kept) == sorted(set(captions) - val)
    assert all(caps == captions[image.name] for image, caps in kept)

    more = dict(captions) | {f"dog{i}.png": ["a dog"] * 3 for i in range(30, 60)}
    again = caption_labels.main(["--captions", str(write_pairs(tmp_path / "more", more)), "--class", DOG, "--class",
                                 PERSON, "--output", str(tmp_path / "labelled_more")])
    val_more = {p.name for p in (tmp_path / "labelled_more" / "val").rglob("*.png")}
    assert val_more & set(captions) == val and again["val"]["dog"] > counts["val"]["dog"]  # the old split stays


def test_per_class_balances_the_classes(tmp_path):
    captions = {f"dog{i}.png": ["a dog"] * 3 for i in range(40)} | {f"kid{i}.png": ["a man"] * 3 for i in range(12)}
    out = tmp_path / "labelled"
    counts = caption_labels.main(["--captions", str(write_pairs(tmp_path / "d", captions)), "--class", DOG, "--class",
                                  PERSON, "--output", str(out), "--per_class", "12"])
    assert sum(c["dog"] for c in counts.values()) == 12 and sum(c["person"] for c in counts.values()) == 12


@pytest.mark.parametrize("specs, says", [(["dog"], "write NAME=WORD"), (["dog=", PERSON], "write NAME=WORD"),
                                         ([DOG], "at least two"), ([DOG, "dog=cat"], "given twice")])
def test_malformed_classes_are_refused(specs, says):
    with pytest.raises(UserError, match=says):
        caption_labels.word_patterns(specs)


def test_an_empty_class_a_missing_split_and_a_used_folder_are_refused(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "d", {f"dog{i}.png": ["a dog"] * 3 for i in range(6)} | {"kid.png": ["a man"] * 3})
    argv = ["--captions", str(pairs), "--class", DOG, "--class", PERSON]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    cases = [(argv[:4] + ["--class", "person=woman", "--output", str(tmp_path / "a")], "no image of .* is labelled person"),
             (argv + ["--output", str(tmp_path / "b")], "has no person"),  # one person image: train or val, not both
             (argv + ["--output", str(tmp_path / "c")], "not empty")]
    for args, says in cases:
        with pytest.raises(SystemExit):
            caption_labels.main(args)
        assert re.search(says, capsys.readouterr().err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half written
    assert (tmp_path / "c" / "keep.txt").read_text() == "mine"
