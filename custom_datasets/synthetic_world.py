"""The embedded default data: procedurally drawn scenes with a faithful caption each.

Scenes hold one or two shapes with a colour, a size and a position on a 3x3 layout, over a plain
background. Everything is a pure function of (seed, split, index), so runs are reproducible and
the train and val splits never share a scene. It exists so every mode learns something measurable
in minutes on a CPU: MIM (shapes and colours), MLM (caption grammar tied to attributes), ITC
(which caption belongs to which picture), and classification and k-NN probing (the label is the colour
of the first object, one of eight).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (150, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
BACKGROUNDS = {"gray": (128, 128, 128), "beige": (225, 210, 175), "teal": (40, 120, 120), "navy": (25, 35, 80)}
POSITIONS = {"top left": (0, 0), "top": (1, 0), "top right": (2, 0), "left": (0, 1), "center": (1, 1),
             "right": (2, 1), "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2)}
SIZES = {"small": 0.16, "large": 0.3}
SPLIT_OFFSET = {"train": 0, "val": 10_000_000}
LABELS = tuple(sorted(COLORS))  # class names of `Scene.label`
SEGMENTATION_CLASSES = ("background",) + SHAPES  # the values of `render_mask`


def place_phrase(position: str) -> str:
    """"in the center", "on the left", "at the top right", ..."""
    if position == "center":
        return "in the center"
    return f"on the {position}" if position in ("left", "right") else f"at the {position}"


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {place_phrase(self.position)}"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects) + f" on a {self.background} background"

    @property
    def label(self) -> int:
        """The first object's colour: visible in a mean of patch features, so a k-NN probe can see
        when a later stage erodes what image pretraining learned."""
        return LABELS.index(self.objects[0].color)


def make_scene(rng: random.Random) -> Scene:
    background = rng.choice(sorted(BACKGROUNDS))
    positions = rng.sample(sorted(POSITIONS), rng.choice((1, 2)))
    colors = [c for c in sorted(COLORS) if COLORS[c] != BACKGROUNDS[background]]
    objects = tuple(SceneObject(rng.choice(SHAPES), rng.choice(colors), rng.choice(sorted(SIZES)), p) for p in positions)
    return Scene(background, objects)


def draw_objects(draw: ImageDraw.ImageDraw, scene: Scene, size: int, fill_of: Callable[[SceneObject], Any]) -> None:
    """Every object of the scene, in order, filled with `fill_of(object)`: the same pixels for the
    picture and for its mask."""
    cell = size / 3
    for obj in scene.objects:
        cx, cy = (POSITIONS[obj.position][0] + 0.5) * cell, (POSITIONS[obj.position][1] + 0.5) * cell
        r = SIZES[obj.size] * size / 2 * 1.4
        fill = fill_of(obj)
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            w = r / 3
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def render(scene: Scene, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw_objects(ImageDraw.Draw(image), scene, size, lambda obj: COLORS[obj.color])
    return image


def render_mask(scene: Scene, size: int) -> Image.Image:
    """The scene's ground truth for segmentation: 0 where the background shows, else 1 + the index
    of the shape kind (SEGMENTATION_CLASSES), pixel for pixel where `render` paints it."""
    mask = Image.new("L", (size, size), 0)
    draw_objects(ImageDraw.Draw(mask), scene, size, lambda obj: 1 + SHAPES.index(obj.shape))
    return mask


class SyntheticWorld(Dataset):
    """`size` scenes of one split. A sample is `build(image) | {"caption", "label"}`."""

    def __init__(self, split: str = "train", size: int = 2000, seed: int = 0, render_size: int = 96,
                 build: Callable[[Image.Image], dict[str, Any]] | None = None) -> None:
        if split not in SPLIT_OFFSET:
            raise ValueError(f"split must be one of {sorted(SPLIT_OFFSET)}")
        self.split, self.size, self.seed, self.render_size = split, size, seed, render_size
        self.build = build
        self.class_to_idx = {name: i for i, name in enumerate(LABELS)}

    def scene(self, index: int) -> Scene:
        return make_scene(random.Random(f"{self.seed}:{SPLIT_OFFSET[self.split] + index}"))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.scene(index)
        image = render(scene, self.render_size)
        sample = self.build(image, index) if self.build else {"image": image}
        sample.update(caption=scene.caption, label=scene.label)
        return sample
