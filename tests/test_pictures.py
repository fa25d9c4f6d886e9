"""The picture writers: MIM reconstructions (sizes; masked regions drawn from predicted tokens and
differing from the input, visible ones untouched), retrieval examples (the caption's own image
framed), the forgetting chart (points where the values put them), and the pictures and TensorBoard
images a stage writes at its end."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from custom_datasets import batch as B
from main_pretrain_cook import main as pretrain
from models import create_model
from models.heads import MIMHead
from models.visual_tokenizers.kmeans import KMeansTokenizer, patch_vectors
from tests.helpers import randomize_
from tests.test_pretrain_cli import SYNTH, TINY, TINY_BASE
from visualization.canvas import to_rgb
from visualization.mim_pictures import (
    COLUMNS,
    checkerboard,
    mim_reconstruction,
    patch_mask_pixels,
    reconstruction_picture,
)
from visualization.retrieval_pictures import HIT, MISS, retrieval_picture
from experiments.stage_chart import COLOURS, stage_chart


@pytest.fixture(scope="module")
def mim_columns():
    """A random tiny backbone and head on 3 images, tokens drawn through k-means centroids."""
    torch.manual_seed(0)
    backbone = randomize_(create_model("vlmo_tiny_patch16", img_size=32, patch_size=8)).eval()
    head = randomize_(MIMHead(backbone.cfg.embed_dim, 64))
    tokenizer_view = torch.rand(3, 3, 16, 16)  # 4x4 patches of 4x4 pixels, one per backbone patch
    centroids = torch.rand(64, 3 * 4 * 4)
    tokenizer = KMeansTokenizer(centroids, grid=4)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, [1, 2, 5, 6, 9]] = True
    batch = {B.IMAGE: torch.randn(3, 3, 32, 32), B.TOKENIZER_IMAGE: tokenizer_view, B.MASKED_PATCHES: mask,
             B.VISUAL_TOKENS: tokenizer.get_codebook_indices(tokenizer_view)}
    with torch.no_grad():
        columns = mim_reconstruction(backbone, head, batch, lambda ids: tokenizer.decode(ids, 16), (4, 4))
    return columns, batch, tokenizer


def test_mim_reconstruction_columns(mim_columns):
    columns, batch, tokenizer = mim_columns
    pixels, mask = batch[B.TOKENIZER_IMAGE], batch[B.MASKED_PATCHES]
    assert list(columns) == COLUMNS and all(c.shape == (3, 3, 16, 16) for c in columns.values())
    where = patch_mask_pixels(mask, (4, 4), 16).expand_as(pixels)
    assert where.float().mean() == pytest.approx(5 / 16)
    assert torch.equal(columns["input"], pixels)
    # visible patches untouched; masked ones checkered in "masked", drawn from predicted tokens in "predicted"
    assert torch.equal(columns["masked"][~where], pixels[~where])
    assert torch.equal(columns["masked"][where], checkerboard(pixels)[where])
    assert torch.equal(columns["predicted"][~where], pixels[~where])
    assert (columns["predicted"][where] - pixels[where]).abs().mean() > 0.1
    # every drawn patch is a centroid: the target column is exactly the tokenizer's reconstruction
    ids = tokenizer.get_codebook_indices(columns["target tokens"])
    assert torch.equal(ids, batch[B.VISUAL_TOKENS])
    predicted_ids = tokenizer.get_codebook_indices(columns["predicted"])[mask]
    assert torch.equal(patch_vectors(columns["predicted"], 4)[mask], tokenizer.centroids[predicted_ids])


def test_reconstruction_picture_size(mim_columns):
    columns, _, _ = mim_columns
    picture = reconstruction_picture(columns, rows=8, min_cell=64)  # 16 px cells enlarged 4x
    cell, gap, title = 64, 4, 22
    assert picture.size == (4 * (cell + gap) + gap, title + 3 * (cell + gap) + gap)
    # the first cell is the input, enlarged with nearest neighbours
    first = np.asarray(picture)[title + gap: title + gap + cell, gap: gap + cell]
    assert np.array_equal(first, np.asarray(to_rgb(columns["input"][0], 4)))


def test_retrieval_picture_frames_the_captions_own_image():
    similarity = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.7]])  # 3 images x 2 captions
    owner = torch.tensor([0, 1])
    images = {i: torch.full((3, 24, 24), i / 3) for i in range(3)}
    picture = retrieval_picture(similarity, owner, ["caption of image 0", "caption of image 1"], images, [0, 1], k=2,
                                cell=40)
    array = np.asarray(picture)
    left, top, gap = 2 * 40 + 4, 22, 4
    # caption 0: its image ranks first (green frame), image 2 second (grey); caption 1: image 1 first
    assert tuple(array[top + gap, left + gap + 1]) == HIT
    assert tuple(array[top + gap, left + gap + 40 + gap + 1]) == MISS
    assert tuple(array[top + 2 * gap + 40, left + gap + 1]) == HIT
    assert picture.size == (left + 2 * (40 + gap) + gap, top + 2 * (40 + gap) + gap)


def test_stage_chart_puts_points_where_the_values_are():
    runs = {"a": [{"m": 1.0}, {"m": 0.0}], "b": [{"m": 0.5}, {}]}
    chart = np.asarray(stage_chart(["one", "two"], runs, {"m": "metric"}, panel_size=(200, 200)))
    assert chart.shape == (224, 200, 3)

    def rows_with(colour):
        return np.unique(np.nonzero((chart == colour).all(-1))[0])

    top, bottom = 24 + 26, 24 + 200 - 40  # the y range of values 1 and 0
    a_rows, b_rows = rows_with(COLOURS[0]), rows_with(COLOURS[1])
    assert a_rows.min() <= top + 1 and a_rows.max() >= bottom - 1  # from 1.0 down to 0.0
    b_points = b_rows[b_rows > 24]
    assert abs(b_points.mean() - (top + bottom) / 2) < 4 and np.ptp(b_points) <= 8  # one point at 0.5


def test_a_stage_writes_its_pictures_and_tensorboard_images(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "mim"
    pretrain(TINY + SYNTH + ["--epochs", "2", "--output_dir", str(out)])
    path = out / "pictures" / "mim_reconstructions.png"
    assert f"pictures: {path}" in capsys.readouterr().out
    picture = Image.open(path)
    rows = min(8, 16)  # the 16 held-out samples, first 8 drawn; 16 px tokenizer views enlarged 8x
    assert picture.size == (4 * (128 + 4) + 4, 22 + rows * (128 + 4) + 4)
    events = EventAccumulator(str(out), size_guidance={"images": 0}).Reload()
    assert events.Tags()["images"] == ["pictures/mim_reconstructions"]
    image = events.Images("pictures/mim_reconstructions")[0]
    assert (image.width, image.height) == picture.size and image.step == 1999
    pretrain(TINY + SYNTH + ["--epochs", "1", "--no_pictures", "--output_dir", str(tmp_path / "quiet")])
    assert not (tmp_path / "quiet" / "pictures").exists()


def test_a_loss_chart_panel_scales_its_axis_to_the_largest_value():
    runs = {"a": [{"loss": 4.0}, {"loss": 2.0}]}  # axis 0..4: 4.0 at the top, 2.0 half-way
    chart = np.asarray(stage_chart(["one", "two"], runs, {"loss": "loss"}, panel_size=(200, 200)))
    rows = np.unique(np.nonzero((chart == COLOURS[0]).all(-1))[0])
    rows = rows[rows > 24]
    top, bottom = 24 + 26, 24 + 200 - 40
    assert rows.min() <= top + 4 and abs(rows.max() - (top + bottom) / 2) <= 4


def test_an_image_text_stage_draws_retrieval_from_the_reports_own_scores(tmp_path, monkeypatch, capsys):
    """The held-out pairs are embedded once: the stage report's scores also draw the picture."""
    import json

    from models import retrieval
    from training import stage_eval, stage_pictures
    from util.train_text_tokenizer import main as train_tokenizer

    tokenizer = str(train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "200", "--output",
                                     str(tmp_path / "tok")]))
    calls = []
    real = retrieval.pair_embeddings
    counting = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(stage_eval, "pair_embeddings", counting)
    monkeypatch.setattr(stage_pictures, "pair_embeddings", counting, raising=False)  # were it embedding again
    out = tmp_path / "itc"
    pretrain(TINY_BASE + SYNTH + ["--exp_name", "image_text_itc", "--tokenizer", tokenizer, "--epochs", "1",
                             "--output_dir", str(out)])
    assert len(calls) == 1
    assert {"itc_i2t_r1", "itc_t2i_r5"} <= set(json.loads((out / "stage_report.json").read_text()))
    path = out / "pictures" / "retrieval_examples.png"
    assert f"{path}" in capsys.readouterr().out and Image.open(path).size[0] > 0
