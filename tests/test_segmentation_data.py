"""The segmentation readers on small files in the official layouts: ADE20K (objectInfo150.txt,
0 = unlabelled with --reduce_zero_label), a generic folder with class_names.txt, and .npy tiles
with .npy or PNG masks; and the one-sentence answers to what users get wrong."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.confusion_matrix import SEG_IGNORE
from common.errors import UserError
from custom_datasets.downstream_data import build_downstream_data
from custom_datasets.segmentation_data import find_segmentation_data, read_class_names, read_mask
from custom_datasets.settings import AugmentSettings, FinetuneDataSettings, SegmentationDataSettings

OBJECT_INFO = ("Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n2\t0.1072\t6046\t612\tbuilding;edifice\n"
               "3\t0.0878\t8265\t796\tsky\n")


def ade20k(root: Path, images: int = 3, size: tuple[int, int] = (40, 30)) -> Path:
    """ADEChallengeData2016's layout: JPEG images, PNG masks with 0 = unlabelled and classes 1..3."""
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(images):
            name = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
                root / "images" / split / f"{name}.jpg")
            Image.fromarray(rng.integers(0, 4, (size[1], size[0]), dtype=np.uint8)).save(
                root / "annotations" / split / f"{name}.png")
    (root / "objectInfo150.txt").write_text(OBJECT_INFO)
    return root


def segmentation_data(root: Path, nb_classes: int | None = None, **seg) -> object:
    return build_downstream_data("segmentation", FinetuneDataSettings(data_path=str(root)), AugmentSettings(), 32,
                                 segmentation=SegmentationDataSettings(**seg), nb_classes=nb_classes)


def test_ade20k_layout_with_reduce_zero_label(tmp_path):
    root = ade20k(tmp_path / "ADEChallengeData2016")
    data = segmentation_data(root, reduce_zero_label=True)
    assert data.class_names == ["wall", "building", "sky"]
    assert len(data.train) == 3 and len(data.val) == 3
    raw = np.asarray(Image.open(root / "annotations" / "training" / "ADE_train_00000000.png")).astype(np.int64)
    reduced = read_mask(root / "annotations" / "training" / "ADE_train_00000000.png", reduce_zero_label=True)
    assert (reduced[raw == 0] == SEG_IGNORE).all() and (reduced[raw > 0] == raw[raw > 0] - 1).all()
    sample = data.train[0]
    assert sample["image"].shape == (3, 32, 32) and sample["seg_mask"].dtype == torch.int64
    assert set(sample["seg_mask"].unique().tolist()) <= {0, 1, 2, SEG_IGNORE}
    held_out = data.val[0]  # the base scale (short side 32) and the mask at its own size
    assert held_out["image"].shape == (3, 32, 43) and held_out["seg_mask"].shape == (30, 40)


def test_without_reduce_zero_label_ade20k_masks_are_refused_with_the_fix(tmp_path):
    root = ade20k(tmp_path / "ade")
    with pytest.raises(UserError, match="has label 3 but there are 3 classes.*--reduce_zero_label"):
        segmentation_data(root)


def test_generic_folder_with_train_val_masks_and_class_names(tmp_path):
    root = tmp_path / "fields"
    for split in ("train", "val"):
        (root / "images" / split / "north").mkdir(parents=True)
        (root / "masks" / split / "north").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(root / "images" / split / "north" / f"{i}.png")
            mask = Image.fromarray(np.full((20, 20), i, dtype=np.uint8)).convert("P")  # palette masks keep indices
            mask.save(root / "masks" / split / "north" / f"{i}.png")
        Image.new("RGB", (20, 20)).save(root / "images" / split / "no_mask.png")
    (root / "class_names.txt").write_text("soil\ncrop\n")
    data = segmentation_data(root)
    assert data.class_names == ["soil", "crop"] and len(data.train) == 2  # the image without a mask is left out
    assert data.val[1]["seg_mask"].unique().tolist() == [1]


def test_npy_tiles_with_npy_and_png_masks(tmp_path):
    root = tmp_path / "tiles"
    rng = np.random.default_rng(1)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            np.save(root / "images" / split / f"t{i}.npy", rng.integers(0, 4000, (5, 24, 24)).astype(np.uint16))
            labels = rng.integers(0, 3, (24, 24))
            if i == 0:
                np.save(root / "annotations" / split / f"t{i}.npy", labels.astype(np.int32))
            else:
                Image.fromarray(labels.astype(np.uint8)).save(root / "annotations" / split / f"t{i}.png")
    data = segmentation_data(root, nb_classes=3, bands="3,2,1")
    assert data.train.scaler is not None  # 16-bit tiles: the training set's band statistics
    assert data.class_names == ["class_0", "class_1", "class_2"]
    for sample in (data.train[0], data.train[1], data.val[0]):
        assert sample is not None and sample["image"].shape[0] == 3


def test_the_class_count_is_required_when_no_file_names_the_classes(tmp_path):
    root = ade20k(tmp_path / "ade")
    (root / "objectInfo150.txt").unlink()
    with pytest.raises(UserError, match="pass --nb_classes N, or --class_names FILE"):
        find_segmentation_data(str(root), None, None, True, None)
    assert len(find_segmentation_data(str(root), None, 3, True, None).class_names) == 3


def test_colour_masks_and_missing_splits_are_one_sentence(tmp_path):
    root = ade20k(tmp_path / "ade")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "annotations" / "training" / "ADE_train_00000000.png")
    with pytest.raises(UserError, match="is a RGB image; a mask holds one class index per pixel"):
        segmentation_data(root, reduce_zero_label=True)
    empty = tmp_path / "empty"
    (empty / "images" / "training").mkdir(parents=True)
    with pytest.raises(UserError, match="has no train split; it needs images/training/ \\+ annotations/training/"):
        segmentation_data(empty)


def test_an_unreadable_pair_is_skipped_not_fatal(tmp_path):
    root = ade20k(tmp_path / "ade")
    (root / "images" / "training" / "ADE_train_00000002.jpg").write_bytes(b"not a jpeg")
    data = segmentation_data(root, reduce_zero_label=True)
    assert data.train[2] is None and data.train[0] is not None


def test_object_info_names_are_first_synonyms(tmp_path):
    (tmp_path / "objectInfo150.txt").write_text(OBJECT_INFO)
    assert read_class_names(tmp_path, None) == ["wall", "building", "sky"]
    with pytest.raises(UserError, match="--class_names .*missing.txt does not exist"):
        read_class_names(tmp_path, str(tmp_path / "missing.txt"))
