"""Fine-tuning recipes. `beit` is the flags' own defaults (BEiT's ImageNet recipe). `small_data` is
for a few hundred to a few thousand images, where that recipe's regularisers (Mixup/CutMix,
RandAugment, random erasing, smoothing, stochastic depth) keep the training loss at ln(classes):
they are off, batches are small enough for several steps per epoch, crops keep at least half the
image (a crop of 8% often misses what the label is about), the lr is ~3x what linear scaling from
BEiT's batch gives (at batch 16 that rule leaves too few effective updates to fit the training
set), and the run keeps and reports its last epoch: an epoch chosen on a few dozen held-out images
is a noisy pick (docs/downstream.md has the measurements). The model-selection split stays, as an
unbiased monitor the baselines of `experiments/transfer_experiment.py` are tuned on. `auto` picks by the
size of the training folder (for the linear probe only the model-selection split and the last epoch
apply). Explicit flags and `--config` still win over a recipe."""
from __future__ import annotations

import argparse
from typing import Any

from custom_datasets.classification_data import count_training_images

SMALL_DATA_IMAGES = 5000  # below this many training images `auto` means small_data

SMALL_DATA: dict[str, Any] = {
    "mixup": 0.0, "cutmix": 0.0, "aa": "", "reprob": 0.0, "smoothing": 0.0, "drop_path": 0.0,
    "batch_size": 16, "blr": 1e-2, "warmup_epochs": 2.0, "layer_decay": 0.75, "min_crop_scale": 0.5,
    "model_selection_fraction": 0.2, "checkpoint_epoch": "last",
}

# the linear probe trains on cached features without augmentation: of the recipe it takes the
# model-selection split and the last epoch
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "image_classification": {"beit": {}, "small_data": SMALL_DATA},
    "linear_probe": {"beit": {}, "small_data": {"model_selection_fraction": 0.2, "checkpoint_epoch": "last"}},
}
RECIPE_TASKS = tuple(RECIPES)  # the tasks whose recipe is chosen


def chosen_recipe(namespace: argparse.Namespace) -> tuple[str, str]:
    """(recipe name, why) for parsed fine-tuning flags."""
    if namespace.task not in RECIPE_TASKS:
        return "beit", f"--task {namespace.task}"
    if namespace.recipe != "auto":
        return namespace.recipe, f"--recipe {namespace.recipe}"
    images = count_training_images(namespace.data_path, SMALL_DATA_IMAGES) if namespace.data_path else 0
    if images and images < SMALL_DATA_IMAGES:
        return "small_data", f"{images} training images (fewer than {SMALL_DATA_IMAGES})"
    return "beit", f"at least {SMALL_DATA_IMAGES} training images"
