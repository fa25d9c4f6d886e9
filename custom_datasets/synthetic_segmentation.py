"""The synthetic world as a segmentation data set on disk, in ADE20K's layout (so the demo and the
tests read it through the same reader as real data): each scene's picture and its mask (0 for the
background, 1 + the shape kind for each object), plus class_names.txt."""
from __future__ import annotations

from pathlib import Path

from custom_datasets.synthetic_world import SEGMENTATION_CLASSES, SyntheticWorld, render, render_mask

SPLIT_FOLDERS = {"train": "training", "val": "validation"}


def write_synthetic_segmentation(root: str | Path, train: int, val: int, size: int = 64, seed: int = 0) -> Path:
    """`root/images/{training,validation}/*.png`, `root/annotations/...` and `root/class_names.txt`;
    an existing complete set of the same size is kept."""
    root = Path(root)
    for split, count in (("train", train), ("val", val)):
        world = SyntheticWorld(split, count, seed=seed, render_size=size)
        images, masks = (root / kind / SPLIT_FOLDERS[split] for kind in ("images", "annotations"))
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            name = f"scene_{i:06d}.png"
            if (images / name).is_file() and (masks / name).is_file():
                continue
            scene = world.scene(i)
            render_mask(scene, size).save(masks / name)
            render(scene, size).save(images / name)  # last: a half-written pair is redone on the next call
    (root / "class_names.txt").write_text("\n".join(SEGMENTATION_CLASSES) + "\n")
    return root
