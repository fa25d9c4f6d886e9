"""A labelled image set from image-text pairs: an image gets class C when at least --min_votes of
its captions name one of C's words and at most --max_other_votes name another class's (so an
image both classes describe is left out). Writes ImageFolder's layout, OUTPUT/{train,val}/<class>/,
as links to the images, OUTPUT/val_images.txt, the val images to keep out of pretraining, and
OUTPUT/pairs_without_val.json, the pairs less those images (file names relative to the same root),
for an image-text stage or a VQ-KD teacher that must not see the val images' captions.

    python util/caption_labels.py --captions ../shared/data/flickr8k_1k/captions.json \\
        --class "dog=dog,dogs,puppy,puppies" \\
        --class "person=man,men,woman,women,boy,boys,girl,girls,child,children,people,person,kid,kids,lady,guy" \\
        --output outputs/flickr_dog_person --per_class 223    # the set of docs/downstream.md

Captions: a JSON list / JSON Lines of {"caption": str or [str, ...], "filename": ...}, as the
image-text stages read them. The split is by a hash of the file name: stable when images are added."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import UserError, cli_entry  # noqa: E402
from custom_datasets.text_data import read_pairs  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", required=True, help="image-text pairs (.json / .jsonl)")
    p.add_argument("--image_root", default=None, help="folder the file names are relative to (default: the file's)")
    p.add_argument("--class", dest="classes", action="append", required=True, metavar="NAME=WORD,WORD",
                   help="a class and the words whose mention in a caption votes for it (whole words, any case)")
    p.add_argument("--output", required=True, help="a new folder")
    p.add_argument("--min_votes", type=int, default=3, help="captions that must name the class (default: %(default)s)")
    p.add_argument("--max_other_votes", type=int, default=1, help="captions that may name another class "
                   "(default: %(default)s)")
    p.add_argument("--per_class", type=int, default=None, help="at most this many images per class, drawn at random "
                   "(balanced classes; default: all)")
    p.add_argument("--val_fraction", type=float, default=1 / 3, help="(default: 1/3)")
    p.add_argument("--seed", type=int, default=0, help="which images --per_class keeps (default: %(default)s)")
    return p


def word_patterns(specs: list[str]) -> dict[str, re.Pattern]:
    classes = {}
    for spec in specs:
        name, _, words = spec.partition("=")
        words = [w.strip() for w in words.split(",") if w.strip()]
        if not re.fullmatch(r"[\w-]+", name) or not words:
            raise UserError(f"--class {spec!r}: write NAME=WORD,WORD (a name of letters, digits, '_' or '-', then "
                            f"at least one word)")
        if name in classes:
            raise UserError(f"--class {name} is given twice: list all its words in one --class")
        classes[name] = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
    if len(classes) < 2:
        raise UserError("give at least two --class NAME=WORDS: a classifier needs two classes")
    return classes


def label(captions: list[str], classes: dict[str, re.Pattern], min_votes: int, max_other: int) -> str | None:
    votes = {name: sum(bool(pattern.search(c)) for c in captions) for name, pattern in classes.items()}
    winners = [n for n, v in votes.items() if v >= min_votes and all(o <= max_other for m, o in votes.items() if m != n)]
    return winners[0] if len(winners) == 1 else None


def in_val(path: Path, fraction: float) -> bool:
    digest = int(hashlib.sha256(path.name.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


def assign(args, classes: dict[str, re.Pattern], pairs) -> dict[str, dict[str, list[Path]]]:
    """split -> class -> images; checked before anything is written."""
    members: dict[str, list[Path]] = {name: [] for name in classes}
    for image, captions in pairs:
        if (name := label(captions, classes, args.min_votes, args.max_other_votes)) is not None:
            members[name].append(image)
    rng = random.Random(args.seed)
    splits: dict[str, dict[str, list[Path]]] = {"train": {}, "val": {}}
    for name, images in members.items():
        if not images:
            raise UserError(f"no image of {args.captions} is labelled {name}: add words to its --class or lower "
                            f"--min_votes")
        if args.per_class is not None and len(images) > args.per_class:
            images = sorted(rng.sample(images, args.per_class))
        for image in images:
            splits["val" if in_val(image, args.val_fraction) else "train"].setdefault(name, []).append(image)
    missing = [f"{split} has no {name}" for split in splits for name in classes if name not in splits[split]]
    if missing:
        raise UserError(f"{'; '.join(missing)}: too few images labelled; change --val_fraction or the classes")
    return splits


def write_pairs_without(path: Path, pairs, left_out: set[str], args) -> None:
    root = Path(args.image_root or Path(args.captions).parent).resolve()
    kept = [{"caption": captions, "filename": os.path.relpath(image.resolve(), root)}
            for image, captions in pairs if str(image.resolve()) not in left_out]
    path.write_text(json.dumps(kept))


@cli_entry
def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    args = parser().parse_args(argv)
    classes = word_patterns(args.classes)
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {out} is not empty: give a new folder (nothing is overwritten)")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction {args.val_fraction} must lie between 0 and 1")
    pairs = read_pairs(args.captions, args.image_root, flag="--captions")
    splits = assign(args, classes, pairs)
    for split, per_class in splits.items():
        for name, images in per_class.items():
            (out / split / name).mkdir(parents=True, exist_ok=True)
            for image in images:
                os.symlink(image.resolve(), out / split / name / image.name)
    val_images = sorted(str(image.resolve()) for images in splits["val"].values() for image in images)
    (out / "val_images.txt").write_text("".join(f"{path}\n" for path in val_images))
    write_pairs_without(out / "pairs_without_val.json", pairs, set(val_images), args)
    counts = {split: {name: len(images) for name, images in per.items()} for split, per in splits.items()}
    print(f"wrote {out}: " + "; ".join(f"{split} " + ", ".join(f"{n} {c}" for n, c in sorted(per.items()))
                                       for split, per in counts.items()))
    return counts


if __name__ == "__main__":
    main()
