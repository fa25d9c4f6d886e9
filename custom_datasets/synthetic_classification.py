"""The synthetic world as a labelled image folder on disk, in ImageNet's layout (so fine-tuning,
probing and the transfer experiment read it through the same reader as real data):
`root/{train,val}/<colour>/<i>.png`, one folder per colour of each scene's first object (8 classes).

Half the scenes hold two objects, and which one is "first" shows nowhere in the picture: when their
colours differ, no classifier can do better than a coin flip between them. `best_possible_accuracy`
is that ceiling for a split; `single_object=True` keeps only one-object scenes (no ambiguity)."""
from __future__ import annotations

from itertools import count
from pathlib import Path

from custom_datasets.synthetic_world import LABELS, Scene, SyntheticWorld, render


def scenes(split: str, n: int, seed: int, single_object: bool) -> list[tuple[int, Scene]]:
    """The first `n` scenes of the split (with `single_object`, the first `n` that hold one object)."""
    world = SyntheticWorld(split, n, seed=seed)
    picked = ((i, world.scene(i)) for i in count())
    return [next(s for s in picked if not single_object or len(s[1].objects) == 1) for _ in range(n)]


def best_possible_accuracy(split_scenes: list[Scene]) -> float:
    """Percent: one-object scenes and two objects of one colour are certain, others a coin flip."""
    sure = [len(s.objects) == 1 or s.objects[0].color == s.objects[1].color for s in split_scenes]
    return 100.0 * sum(1.0 if ok else 0.5 for ok in sure) / len(sure)


def write_synthetic_classification(root: str | Path, train: int, val: int, render_size: int, seed: int = 1,
                                   single_object: bool = False) -> Path:
    """Write (or keep, when already there) `train` and `val` labelled scenes under `root`."""
    root = Path(root)
    for split, n in (("train", train), ("val", val)):
        for i, scene in scenes(split, n, seed, single_object):
            folder = root / split / LABELS[scene.label]
            if not (folder / f"{i}.png").is_file():
                folder.mkdir(parents=True, exist_ok=True)
                render(scene, render_size).save(folder / f"{i}.png")
    return root
