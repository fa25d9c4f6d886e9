"""The synthetic world asks questions about its scenes (colour, shape, count, position, yes/no) and
makes true/false statements about two scenes, written to disk in VQAv2's and NLVR2's layouts so
the demo and the tests read them through the same readers as the real data sets. Every answer and
label is computed from the scene description, and ten simulated humans answer each question: most
give the true answer, a few (0-3, fixed per question) a plausible wrong one, so the soft scores and
the official accuracy are exercised as on VQAv2."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from custom_datasets import synthetic_world as synthetic
from custom_datasets.synthetic_world import COLORS, POSITIONS, SHAPES, Scene, SyntheticWorld, place_phrase, render

VQA_SPLITS = {"train": "train2014", "val": "val2014"}
NLVR2_SPLITS = {"train": "train", "val": "dev"}
HUMANS = 10


def the(obj_shape: str, color: str | None = None) -> str:
    return f"the {color + ' ' if color else ''}{obj_shape}"


def questions_about(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """Every question this scene answers unambiguously: (question, answer, answer type)."""
    objects = scene.objects
    shapes = [o.shape for o in objects]
    out = [("what color is the background?", scene.background, "other"),
           ("how many objects are there?", str(len(objects)), "number")]
    color = rng.choice(sorted(COLORS))
    out.append((f"how many {color} objects are there?", str(sum(o.color == color for o in objects)), "number"))
    shape = rng.choice(SHAPES)
    out.append((f"is there a {shape}?", "yes" if shape in shapes else "no", "yes/no"))
    for o in objects:
        if shapes.count(o.shape) == 1:
            out.append((f"what color is {the(o.shape)}?", o.color, "other"))
        out.append((f"what shape is {place_phrase(o.position)}?", o.shape, "other"))
        out.append((f"where is {the(o.shape, o.color)}?", o.position, "other"))
    return out


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible mistake of the same type (another colour, shape, place, count or yes/no)."""
    groups = [["yes", "no"], ["0", "1", "2", "3"], sorted(COLORS), list(SHAPES), sorted(POSITIONS),
              sorted(synthetic.BACKGROUNDS)]
    pool = next(group for group in groups if answer in group)
    return rng.choice([a for a in pool if a != answer])


def human_answers(answer: str, rng: random.Random) -> list[str]:
    wrong = rng.choice((0, 0, 1, 2, 3))
    return [answer] * (HUMANS - wrong) + [wrong_answer(answer, rng) for _ in range(wrong)]


def has(scene: Scene, test: Callable) -> bool:
    return any(test(o) for o in scene.objects)


def statement_about(left: Scene, right: Scene, rng: random.Random) -> tuple[str, bool]:
    """One statement about a pair of scenes and whether it holds."""
    color, shape, total = rng.choice(sorted(COLORS)), rng.choice(SHAPES), rng.choice((2, 3, 4))
    side, scene = rng.choice((("left", left), ("right", right)))
    background = scene.background if rng.random() < 0.5 else rng.choice(sorted(synthetic.BACKGROUNDS))
    return rng.choice([
        (f"the {side} image has a {color} object", has(scene, lambda o: o.color == color)),
        (f"the {side} image has a {shape}", has(scene, lambda o: o.shape == shape)),
        (f"both images have a {shape}",
         has(left, lambda o: o.shape == shape) and has(right, lambda o: o.shape == shape)),
        ("the left image has more objects than the right image", len(left.objects) > len(right.objects)),
        ("the two images have the same background", left.background == right.background),
        (f"there are {total} objects in total", len(left.objects) + len(right.objects) == total),
        (f"the {side} image has a {background} background", scene.background == background),
    ])


def balanced_statement(left: Scene, right: Scene, rng: random.Random) -> tuple[str, bool]:
    """A statement whose truth is drawn first (half true, half false), so always answering one way
    scores 50%."""
    want = rng.random() < 0.5
    for _ in range(100):
        text, truth = statement_about(left, right, rng)
        if truth == want:
            return text, truth
    return text, truth


def write_synthetic_vqa(root: str | Path, train: int, val: int, size: int = 64, seed: int = 0,
                        questions_per_scene: int = 3) -> Path:
    """`root/v2_OpenEnded_mscoco_{train2014,val2014}_questions.json`, the matching annotations and
    `root/{train2014,val2014}/COCO_<split>_<id>.jpg`; an existing complete set is kept."""
    root = Path(root)
    for split, count in (("train", train), ("val", val)):
        name = VQA_SPLITS[split]
        done = root / f"v2_mscoco_{name}_annotations.json"
        if done.is_file() and len(json.loads(done.read_text())["annotations"]) == count * questions_per_scene:
            continue
        world = SyntheticWorld(split, count, seed=seed, render_size=size)
        (root / name).mkdir(parents=True, exist_ok=True)
        questions, annotations = [], []
        for i in range(count):
            scene, rng = world.scene(i), random.Random(f"vqa:{seed}:{synthetic.SPLIT_OFFSET[split] + i}")
            image_id = i + 1
            render(scene, size).save(root / name / f"COCO_{name}_{image_id:012d}.jpg", quality=95)
            for k, (question, answer, kind) in enumerate(rng.sample(questions_about(scene, rng), questions_per_scene)):
                qid = image_id * 1000 + k
                questions.append({"image_id": image_id, "question": question, "question_id": qid})
                answers = human_answers(answer, rng)
                annotations.append({"question_id": qid, "image_id": image_id, "answer_type": kind,
                                    "question_type": " ".join(question.split()[:2]), "multiple_choice_answer": answer,
                                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                                for j, a in enumerate(answers)]})
        (root / f"v2_OpenEnded_mscoco_{name}_questions.json").write_text(
            json.dumps({"data_subtype": name, "questions": questions}))
        done.write_text(json.dumps({"data_subtype": name, "annotations": annotations}))  # last: marks the split done
    return root


def write_synthetic_nlvr2(root: str | Path, train: int, val: int, size: int = 64, seed: int = 0) -> Path:
    """`root/{train,dev}.json` (JSON Lines) and the image pairs in `root/images/train/<directory>/`
    and `root/dev/`, one statement per pair of scenes; an existing complete set is kept."""
    root = Path(root)
    for split, count in (("train", train), ("val", val)):
        name = NLVR2_SPLITS[split]
        done = root / f"{name}.json"
        if done.is_file() and len(done.read_text().splitlines()) == count:
            continue
        world = SyntheticWorld(split, 2 * count, seed=seed, render_size=size)
        lines = []
        for i in range(count):
            left, right = world.scene(2 * i), world.scene(2 * i + 1)
            rng = random.Random(f"nlvr2:{seed}:{synthetic.SPLIT_OFFSET[split] + i}")
            text, truth = balanced_statement(left, right, rng)
            record = {"identifier": f"{name}-{i}-0-0", "sentence": text, "label": str(truth)}
            folder = root / name
            if split == "train":
                record["directory"] = i % 100
                folder = root / "images" / name / str(i % 100)
            folder.mkdir(parents=True, exist_ok=True)
            render(left, size).save(folder / f"{name}-{i}-0-img0.png")
            render(right, size).save(folder / f"{name}-{i}-0-img1.png")
            lines.append(json.dumps(record))
        done.write_text("\n".join(lines) + "\n")  # last: marks the split done
    return root


def write_synthetic_pairs(root: str | Path, train: int, val: int, size: int = 64, seed: int = 0) -> Path:
    """`root/{train,val}.json` image-caption pair files (`{"filename", "caption"}`) and their images
    in `root/images/`, for retrieval; an existing complete set is kept."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", val)):
        done = root / f"{split}.json"
        if done.is_file() and len(json.loads(done.read_text())) == count:
            continue
        world = SyntheticWorld(split, count, seed=seed, render_size=size)
        records = []
        for i in range(count):
            scene = world.scene(i)
            render(scene, size).save(root / "images" / f"{split}_{i:06d}.png")
            records.append({"filename": f"images/{split}_{i:06d}.png", "caption": scene.caption})
        done.write_text(json.dumps(records))  # last: marks the split done
    return root
