"""Image + mask pairs for semantic segmentation, in ADE20K's layout and its generic form:

    ROOT/images/{training,validation}/<name>.jpg|png|.npy
    ROOT/annotations/{training,validation}/<name>.png|.npy     (also masks/, and train/ val/)

A mask holds one class index per pixel (PNG mode L/P/I;16, or a 2-D integer `.npy`); 255 is
unlabelled. `--reduce_zero_label` reads ADE20K's convention (0 = unlabelled, classes from 1) as
mmseg does: 0 becomes 255 and every other label moves down by one. Class names come from
`--class_names`, else ROOT/class_names.txt (one per line), else ADE20K's ROOT/objectInfo150.txt.
Tiles (`.npy` images, `--bands`) are scaled with the training set's band statistics, as in
pretraining. Unreadable pairs are skipped and counted, as everywhere."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from common.confusion_matrix import SEG_IGNORE
from common.console import say
from common.errors import UserError
from custom_datasets.file_index import scan
from custom_datasets.image_io import ARRAY_EXTENSIONS, BandScaler, open_rgb, open_tile_rgb
from custom_datasets.segmentation_transforms import SegmentationView

log = logging.getLogger(__name__)
IMAGE_FOLDERS, MASK_FOLDERS = ("images",), ("annotations", "masks")
SPLIT_NAMES = {"train": ("training", "train"), "val": ("validation", "val")}
CLASS_NAME_FILES = ("class_names.txt", "objectInfo150.txt")
LABEL_PROBE = 20  # masks whose labels are checked against the class count before training starts


def split_folders(root: Path, split: str) -> tuple[Path, Path]:
    """(images folder, masks folder) of one split, or a sentence saying what is missing."""
    for name in SPLIT_NAMES[split]:
        images = root / IMAGE_FOLDERS[0] / name
        masks = next((root / m / name for m in MASK_FOLDERS if (root / m / name).is_dir()), None)
        if images.is_dir() and masks is not None:
            return images, masks
    wanted = " or ".join(f"images/{n}/ + annotations/{n}/" for n in SPLIT_NAMES[split])
    raise UserError(f"--data_path {root} has no {split} split; it needs {wanted} (ADE20K's layout)")


def pair_files(images: Path, masks: Path) -> tuple[list[tuple[Path, Path]], int]:
    """(image, mask) pairs matched by relative path without extension, sorted; and the number of
    images that have no mask."""
    mask_of = {str(Path(rel).with_suffix("")): rel for rel in scan(masks)}
    pairs, unmatched = [], 0
    for rel in sorted(scan(images)):
        mask = mask_of.get(str(Path(rel).with_suffix("")))
        if mask is None:
            unmatched += 1
        else:
            pairs.append((images / rel, masks / mask))
    return pairs, unmatched


def read_mask(path: Path, reduce_zero_label: bool = False) -> np.ndarray:
    """`[H, W]` int64 class indices of a mask file."""
    if path.suffix.lower() in ARRAY_EXTENSIONS:
        arr = np.load(path, allow_pickle=False)
        arr = arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr
        if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or np.array_equal(arr, np.round(arr))):
            raise ValueError(f"{path}: a mask must be a 2-D array of class indices, got {arr.dtype} {arr.shape}")
    else:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "I;16L", "I;16B", "1"):
                raise ValueError(f"{path} is a {img.mode} image; a mask holds one class index per pixel (PNG mode "
                                 f"L or P), not colours")
            arr = np.asarray(img)
    mask = arr.astype(np.int64)
    if reduce_zero_label:
        mask = np.where(mask == 0, SEG_IGNORE, mask - 1)
        mask[mask == SEG_IGNORE - 1] = SEG_IGNORE
    return mask


def read_class_names(root: Path, given: str | None) -> list[str] | None:
    """Names from --class_names or a file in ROOT; ADE20K's objectInfo150.txt (Idx, Ratio, Train,
    Val, Name columns) gives each class's first synonym."""
    path = Path(given) if given else next((root / f for f in CLASS_NAME_FILES if (root / f).is_file()), None)
    if path is None:
        return None
    if not path.is_file():
        raise UserError(f"--class_names {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.name == "objectInfo150.txt":
        rows = [line.split("\t") if "\t" in line else line.split(None, 4) for line in lines[1:]]
        return [row[-1].split(";")[0].split(",")[0].strip() for row in rows]
    return lines


class SegmentationPairs(Dataset):
    """A sample is `view(image, mask)` (image + "seg_mask" tensors), or None when the pair cannot
    be read (the collate function drops and counts it)."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], view: SegmentationView, reduce_zero_label: bool = False,
                 bands: Sequence[int] | None = None, scaler: BandScaler | None = None,
                 class_names: Sequence[str] = ()) -> None:
        """`class_names`: in index order, what the per-class metrics are called."""
        self.pairs, self.view, self.reduce_zero_label = list(pairs), view, reduce_zero_label
        self.bands, self.scaler, self.class_names = bands, scaler, list(class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, mask_path = self.pairs[index]
        is_tile = image_path.suffix.lower() in ARRAY_EXTENSIONS
        image = open_tile_rgb(image_path, self.bands, self.scaler) if is_tile else open_rgb(image_path)
        return image, read_mask(mask_path, self.reduce_zero_label)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            return self.view(*self.read(index))
        except Exception as err:  # noqa: BLE001 - corrupt files and size mismatches are skipped and counted
            log.debug("skipping unreadable pair %s: %s", self.pairs[index], err)
            return None


@dataclass
class SegmentationSource:
    train_pairs: list[tuple[Path, Path]]
    val_pairs: list[tuple[Path, Path]]
    class_names: list[str]
    scaler: BandScaler | None


def check_labels(pairs: Sequence[tuple[Path, Path]], num_classes: int, reduce_zero_label: bool) -> None:
    """The first masks' labels fit the class count: a wrong count or a missing --reduce_zero_label
    is said before training, not found as a crash (or silent nonsense) hours in."""
    for _, mask_path in pairs[:LABEL_PROBE]:
        try:
            mask = read_mask(mask_path, reduce_zero_label)
        except ValueError as err:
            raise UserError(str(err)) from None
        except OSError:
            continue
        labels = mask[mask != SEG_IGNORE]
        if labels.size and labels.max() >= num_classes:
            hint = "" if reduce_zero_label else " or --reduce_zero_label (ADE20K: 0 means unlabelled)"
            raise UserError(f"{mask_path} has label {int(labels.max())} but there are {num_classes} classes; pass "
                            f"--nb_classes{hint}")


def find_segmentation_data(data_path: str, class_names_file: str | None, nb_classes: int | None,
                           reduce_zero_label: bool, bands: Sequence[int] | None) -> SegmentationSource:
    root = Path(data_path)
    found = {}
    for split in ("train", "val"):
        images, masks = split_folders(root, split)
        pairs, unmatched = pair_files(images, masks)
        if not pairs:
            raise UserError(f"no image in {images} has a mask of the same name in {masks}")
        if unmatched:
            say(f"{images}: {unmatched} images without a mask in {masks} are left out")
        found[split] = pairs
    names = read_class_names(root, class_names_file)
    if names is None and nb_classes is None:
        raise UserError(f"the number of classes is unknown: pass --nb_classes N, or --class_names FILE (one name per "
                        f"line), or put class_names.txt in {root}")
    if names is not None and nb_classes is not None and nb_classes != len(names):
        raise UserError(f"--nb_classes {nb_classes} but the class-name file lists {len(names)} classes")
    names = names or [f"class_{i}" for i in range(nb_classes)]
    check_labels(found["train"], len(names), reduce_zero_label)
    tiles = [image for image, _ in found["train"][:64] if image.suffix.lower() in ARRAY_EXTENSIONS]
    scaler = BandScaler.fit(tiles, bands) if tiles else None
    return SegmentationSource(found["train"], found["val"], names, scaler)
