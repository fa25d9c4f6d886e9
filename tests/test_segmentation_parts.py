"""Semantic segmentation, part by part: the confusion-matrix metrics against hand-computed cases,
the multi-level features, the decoder's gradients, joint augmentations that keep image and mask
aligned, and sliding-window inference."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from common.confusion_matrix import SEG_IGNORE, ConfusionMatrix
from custom_datasets.segmentation_transforms import SegmentationView, base_size
from models import create_model
from models.downstream import DownstreamOptions, SegmentationOptions, SemanticSegmentation
from models.segmentation_head import SegmentationHead, default_block_indices
from models.segmentation_inference import segment_probabilities, slide_logits, whole_logits, window_starts
from models.segmenter import Segmenter
from tests.helpers import max_diff, randomize_


def tiny_segmenter(classes: int = 5, size: int = 32) -> Segmenter:
    torch.manual_seed(0)
    backbone = create_model("vlmo_tiny_patch16", img_size=size, patch_size=8)
    return Segmenter(backbone, SegmentationHead(192, classes, 32, 16, default_block_indices(4))).eval()


def three_class_task() -> SemanticSegmentation:
    backbone = create_model("vlmo_tiny_patch16", img_size=32, patch_size=8)
    return SemanticSegmentation(backbone, DownstreamOptions(num_classes=3, segmentation=SegmentationOptions(16, 8)))


def random_held_out(seed: int, count: int, image: tuple[int, int], mask: tuple[int, int]) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(3, *image, generator=gen), "seg_mask": torch.randint(0, 3, mask, generator=gen)}
            for _ in range(count)]


# ---- metrics ----------------------------------------------------------------------------------------
def test_miou_matches_a_hand_computed_case_with_ignored_pixels_and_an_absent_class():
    target = torch.tensor([[0, 0, 1], [1, 2, SEG_IGNORE]])
    predicted = torch.tensor([[0, 1, 1], [1, 0, 2]])  # the 2 at the ignored pixel counts nowhere
    matrix = ConfusionMatrix(4)
    matrix.update(predicted, target)
    iou = matrix.per_class_iou()
    # class 0: TP 1, FP 1 (a 2 read as 0), FN 1 (a 0 read as 1) -> 1/3; class 1: TP 2, FP 1 -> 2/3;
    # class 2: TP 0, FN 1 -> 0; class 3 occurs nowhere -> no IoU (left out of the mean)
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert torch.isnan(iou[3])
    summary = matrix.summary()
    assert summary["mIoU"] == pytest.approx(100 / 3)
    assert summary["aAcc"] == pytest.approx(60.0)  # 3 of 5 labelled pixels
    assert summary["mAcc"] == pytest.approx(50.0)  # (1/2 + 2/2 + 0/1) / 3


def test_a_class_only_predicted_counts_with_iou_zero():
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    assert matrix.per_class_iou()[:1].tolist() == [0.5] and matrix.per_class_iou()[2] == 0
    assert torch.isnan(matrix.per_class_iou()[1])
    assert matrix.summary()["mIoU"] == pytest.approx(25.0)


def test_matrices_of_parts_add_up_to_the_whole_and_bad_labels_are_refused():
    gen = torch.Generator().manual_seed(0)
    target, predicted = torch.randint(0, 6, (2, 40, 40), generator=gen), torch.randint(0, 6, (2, 40, 40), generator=gen)
    whole, first, second = ConfusionMatrix(6), ConfusionMatrix(6), ConfusionMatrix(6)
    whole.update(predicted, target)
    first.update(predicted[0], target[0])
    second.update(predicted[1], target[1])
    first.add(second.counts)
    assert torch.equal(first.counts, whole.counts)
    with pytest.raises(ValueError, match="label 7 but there are 6 classes"):
        whole.update(torch.zeros(3, dtype=torch.long), torch.tensor([0, 7, SEG_IGNORE]))


# ---- model ------------------------------------------------------------------------------------------
def test_block_outputs_are_the_blocks_own_outputs():
    backbone = randomize_(create_model("vlmo_tiny_patch16", img_size=32, patch_size=8)).eval()
    images = torch.randn(2, 3, 32, 32)
    outputs = backbone.image_block_outputs(images, (0, 2, 3))
    assert torch.allclose(backbone.norm(outputs[-1]), backbone.encode_image(images), atol=1e-6)
    only_first = backbone.image_block_outputs(images, (0,))[0]
    assert torch.equal(only_first, outputs[0])
    with pytest.raises(ValueError, match="0..3"):
        backbone.image_block_outputs(images, (4,))


@pytest.mark.parametrize("size", [(16, 16), (7, 11), (2, 2), (1, 5)])
def test_pyramid_pooling_bins_equal_adaptive_average_pooling(size):
    from models.segmentation_head import adaptive_average

    x = torch.randn(2, 3, *size)
    for bins in (1, 2, 3, 6):
        assert torch.allclose(adaptive_average(x, bins), torch.nn.functional.adaptive_avg_pool2d(x, bins), atol=1e-6)


def test_default_blocks_are_beits_for_base_and_large():
    assert default_block_indices(12) == (3, 5, 7, 11)
    assert default_block_indices(24) == (7, 11, 15, 23)
    assert default_block_indices(4) == (0, 1, 2, 3)


def test_every_trainable_parameter_of_the_task_gets_a_gradient():
    task = three_class_task().train()
    frozen = set(task.frozen_parameter_names())
    assert "backbone.norm.weight" in frozen and not any(n.startswith("backbone.blocks.") for n in frozen)
    mask = torch.randint(0, 3, (2, 32, 32))
    mask[:, :4] = SEG_IGNORE
    out = task({"image": torch.randn(2, 3, 32, 32), "seg_mask": mask})
    out["loss"].backward()
    missing = [n for n, p in task.model.named_parameters() if n not in frozen and p.grad is None]
    assert not missing, missing
    assert out["loss"].item() == pytest.approx(out["loss_decode"].item() + 0.4 * out["loss_aux"].item(), rel=1e-5)


def test_a_batch_without_labelled_pixels_has_loss_zero_not_nan():
    task = three_class_task()
    out = task({"image": torch.randn(2, 3, 32, 32), "seg_mask": torch.full((2, 32, 32), SEG_IGNORE)})
    assert out["loss"].item() == 0.0


def test_a_training_batch_of_one_image_gets_its_mirror_image():
    task = three_class_task()
    image, mask = torch.randn(1, 3, 32, 32), torch.randint(0, 3, (1, 32, 32))
    batch = task.prepare_train_batch({"image": image, "seg_mask": mask})
    assert torch.equal(batch["image"][1], image[0].flip(-1)) and torch.equal(batch["seg_mask"][1], mask[0].flip(-1))
    assert torch.isfinite(task.train()(batch)["loss"])


# ---- joint augmentation -----------------------------------------------------------------------------
COLOURS = np.array([(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)], dtype=np.uint8)


def blocks_image(width: int = 96, height: int = 72, block: int = 12) -> tuple[Image.Image, np.ndarray]:
    """Blocks of four colours; the mask is each pixel's colour index, drawn from the image itself."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, (height // block, width // block)).repeat(block, 0).repeat(block, 1)
    return Image.fromarray(COLOURS[ids]), ids


def colour_ids(image: torch.Tensor) -> np.ndarray:
    """Index of the palette colour each pixel has exactly (after un-normalising), else -1."""
    pixels = np.round((image.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).astype(np.int64)  # [H, W, 3]
    match = (pixels[:, :, None, :] == COLOURS[None, None].astype(np.int64)).all(-1)  # [H, W, 4]
    return np.where(match.any(-1), match.argmax(-1), -1)


@pytest.mark.parametrize("seed", range(12))
def test_geometric_augmentation_keeps_image_and_mask_aligned(seed):
    image, mask = blocks_image()
    view = SegmentationView(48, True, photometric=False)
    out = view(image, mask, random.Random(seed))
    ids, labels = colour_ids(out["image"]), out["seg_mask"].numpy()
    labelled = labels != SEG_IGNORE
    exact = labelled & (ids >= 0)
    assert exact.mean() > 0.5 * labelled.mean()  # most pixels keep an exact colour (block interiors)
    assert (ids[exact] == labels[exact]).all()
    assert (out["image"][:, ~labelled] == 0).all()  # padding: ignored in the mask, zero in the image


def test_flipping_moves_image_and_mask_together():
    image, mask = blocks_image(48, 48)
    flipped = SegmentationView(48, True, ratio_range=(1.0, 1.0), hflip=1.0, photometric=False)(image, mask, random.Random(0))
    plain = SegmentationView(48, True, ratio_range=(1.0, 1.0), hflip=0.0, photometric=False)(image, mask, random.Random(0))
    assert torch.equal(flipped["seg_mask"], plain["seg_mask"].flip(-1))
    assert torch.equal(flipped["image"], plain["image"].flip(-1))


def test_photometric_distortion_changes_the_image_only():
    image, mask = blocks_image()
    for seed in range(6):
        distorted = SegmentationView(48, True, photometric=True)(image, mask, random.Random(seed))
        plain = SegmentationView(48, True, photometric=False)(image, mask, random.Random(seed))
        assert torch.equal(distorted["seg_mask"], plain["seg_mask"])


def test_held_out_view_keeps_the_mask_and_rescales_the_image_to_the_base_scale():
    image, mask = blocks_image(96, 72)
    out = SegmentationView(48, False)(image, mask)
    assert tuple(out["image"].shape[1:]) == (48, 64) and torch.equal(out["seg_mask"], torch.from_numpy(mask))
    assert base_size(2048, 512, 512) == (2048, 512) and base_size(4000, 500, 512) == (2048, 256)


# ---- inference --------------------------------------------------------------------------------------
def test_sliding_window_equals_whole_image_when_the_window_covers_the_image():
    model = tiny_segmenter()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(slide_logits(model, images, 32, 21), whole_logits(model, images, 32)) == 0
        assert max_diff(segment_probabilities(model, images, 32, "slide"),
                        segment_probabilities(model, images, 32, "whole")) == 0


def test_windows_cover_every_pixel_and_overlaps_are_averaged():
    assert window_starts(100, 64, 42) == [0, 36] and window_starts(64, 64, 42) == [0]
    assert window_starts(200, 64, 42) == [0, 42, 84, 126, 136]
    conv = torch.nn.Conv2d(3, 4, 1)  # pixelwise: any window sees the same logits as the whole image
    images = torch.randn(1, 3, 70, 101)
    with torch.no_grad():
        assert max_diff(slide_logits(conv, images, 32, 21), conv(images)) < 1e-5
        small = torch.randn(1, 3, 20, 27)  # smaller than a window: padded, then cut back
        assert max_diff(slide_logits(conv, small, 32, 21), conv(small)) < 1e-5


def test_multi_scale_flip_gives_probabilities_at_the_requested_size():
    model = tiny_segmenter()
    with torch.no_grad():
        probs = segment_probabilities(model, torch.randn(1, 3, 40, 56), 32, "slide", ratios=(0.5, 1.0, 1.5), flip=True,
                                      out_size=(30, 42))
    assert probs.shape == (1, 5, 30, 42)
    assert torch.allclose(probs.sum(1), torch.ones(1, 30, 42), atol=1e-5)


def test_held_out_images_are_batched_only_with_images_and_masks_of_their_size():
    from models.downstream.semantic_segmentation import same_size_runs

    def sample(h, w, mh=None):
        return {"image": torch.zeros(3, h, w), "seg_mask": torch.zeros(mh or h, w)}

    dataset = [sample(4, 4), sample(4, 4), sample(4, 4, 5), None, sample(4, 4), sample(4, 4), sample(4, 4), sample(6, 4)]
    runs = list(same_size_runs(dataset, range(len(dataset)), 2))
    assert [len(r) for r in runs] == [2, 1, 1, 2, 1, 1]
    assert runs[2] == [None]


def test_batched_evaluation_equals_one_image_at_a_time():
    task = three_class_task().eval()
    dataset = random_held_out(0, 5, (32, 40), (30, 37))
    with torch.no_grad():
        batched, single = task.evaluate_set(dataset, 4, torch.device("cpu")), task.evaluate_set(dataset, 1, torch.device("cpu"))
    assert batched == pytest.approx(single, abs=1e-9)


def _evaluate_in_process(rank, world, out_path):
    torch.manual_seed(0)
    task = three_class_task().eval()
    dataset = random_held_out(1, 7, (32, 32), (32, 32))
    with torch.no_grad():
        stats = task.evaluate_set(dataset, 2, torch.device("cpu"))
    torch.save(stats, f"{out_path}.{rank}")


def test_two_ranks_sum_their_confusion_matrices_into_the_one_process_metrics(tmp_path):
    from tests.distributed_harness import run_in_processes

    run_in_processes(_evaluate_in_process, 2, str(tmp_path / "stats"))
    _evaluate_in_process(0, 1, str(tmp_path / "single"))
    single = torch.load(tmp_path / "single.0", weights_only=True)
    for rank in (0, 1):  # every rank reports the whole held-out set's metrics
        assert torch.load(tmp_path / f"stats.{rank}", weights_only=True) == pytest.approx(single, abs=1e-9)
