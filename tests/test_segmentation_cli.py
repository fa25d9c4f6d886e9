"""Semantic segmentation end to end on the synthetic world's masks (written in ADE20K's layout):
`main_finetune.py --task semantic_segmentation`, its checkpoint evaluated again, TensorBoard's
picture panel, `util/predict.py` masks and overlays, and the ONNX export with a dynamic size served
the same way."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from custom_datasets.synthetic_segmentation import write_synthetic_segmentation
from main_finetune import main as finetune_main
from training.finetune import per_class_table
from models.checkpoints import read_model_checkpoint

TINY = ["--task", "semantic_segmentation", "--input_size", "32", "--patch_size", "8", "--model", "vlmo_tiny_patch16",
        "--batch_size", "8", "--decoder_channels", "16", "--aux_channels", "8", "--num_workers", "0", "--drop_path", "0",
        "--warmup_epochs", "1", "--print_freq", "1000"]
ABSENT = ("bicycle", "zebra")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("segmentation")
    data = write_synthetic_segmentation(root / "data", 48, 10, size=32)
    with open(data / "class_names.txt", "a") as names:  # classes the masks never hold, as with --nb_classes above them
        names.write("\n".join(ABSENT) + "\n")
    out = root / "run"
    stats = finetune_main(TINY + ["--data_path", str(data), "--epochs", "2", "--lr", "1e-3", "--output_dir", str(out)])
    return data, out, stats


def test_the_checkpoint_describes_the_segmenter_and_its_metrics(trained):
    data, out, stats = trained
    ckpt = read_model_checkpoint(str(out / "checkpoint-best.pth"))
    assert ckpt.info["task"] == "semantic_segmentation"
    assert ckpt.info["class_names"] == ["background", "circle", "square", "triangle", "cross", *ABSENT]
    assert ckpt.info["heads"]["seg_head"]["channels"] == 16
    assert ckpt.info["segmentation_inference"] == {"mode": "slide", "stride": 21}
    log = [strict_json(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 2 and {"test_mIoU", "test_IoU.background", "train_loss_aux"} <= set(log[0])
    assert stats["best_mIoU"] == max(entry["test_mIoU"] for entry in log)


def strict_json(line: str) -> dict:
    def refuse(constant):
        raise ValueError(f"log.txt holds a bare {constant}, which is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_classes_absent_from_the_held_out_set_are_reported_as_absent(trained, capsys):
    """Classes in neither the held-out masks nor the predictions have no IoU: the run goes on (they
    are not divergence), log.txt says null, the mean leaves them out, the table names them."""
    data, out, stats = trained
    log = [strict_json(line) for line in (out / "log.txt").read_text().splitlines()]
    for entry in log:
        assert all(entry[f"test_IoU.{name}"] is None for name in ABSENT)
        present = [entry[f"test_IoU.{name}"] for name in ("background", "circle", "square", "triangle", "cross")]
        assert entry["test_mIoU"] == pytest.approx(sum(present) / len(present))
    table = per_class_table({k[len("test_"):]: v for k, v in stats.items() if k.startswith("test_")})
    assert "zebra" in table and "absent" in table.split("zebra")[1].splitlines()[0]
    assert "mean over the 5 present classes" in table


def test_evaluating_the_checkpoint_again_gives_its_metrics(trained):
    data, out, stats = trained
    again = finetune_main(["--task", "semantic_segmentation", "--data_path", str(data), "--input_size", "32", "--eval",
                           "--finetune", str(out / "checkpoint-best.pth"), "--num_workers", "0",
                           "--output_dir", str(out / "eval")])
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    best = max(log, key=lambda entry: entry["test_mIoU"])
    assert again["mIoU"] == pytest.approx(best["test_mIoU"], abs=1e-9)
    assert again["IoU.background"] == pytest.approx(best["test_IoU.background"], abs=1e-9)


def test_tensorboard_and_pictures_show_input_truth_and_prediction(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = trained
    picture = Image.open(out / "pictures" / "semantic_segmentation_examples.png")
    assert picture.width > 3 * 100 and picture.height > 4 * 100  # 3 columns, 4 held-out images
    events = EventAccumulator(str(out), size_guidance={"images": 0}).Reload()
    assert "semantic_segmentation/examples" in events.Tags()["images"]
    assert len(events.Images("semantic_segmentation/examples")) == 2  # one per epoch


def test_predict_writes_class_index_masks_and_overlays_that_match_the_model(trained, tmp_path, capsys):
    from serving import open_servable
    from serving.segmentation import segment_image
    from util.predict import main as predict

    data, out, _ = trained
    images = sorted((data / "images" / "validation").glob("*.png"))[:3]
    folder = tmp_path / "inputs"
    folder.mkdir()
    for path in images:
        Image.open(path).resize((45, 37)).save(folder / path.name)  # another size and aspect than the crop
    (folder / "broken.png").write_bytes(b"no image")
    result = predict(["--checkpoint", str(out / "checkpoint-best.pth"), "--input", str(folder),
                      "--output", str(tmp_path / "pred.json")])
    assert len(result["predictions"]) == 3 and len(result["errors"]) == 1
    servable = open_servable(str(out / "checkpoint-best.pth"))
    for path, entry in result["predictions"].items():
        mask = Image.open(entry["mask"])
        assert mask.mode == "P" and mask.size == (45, 37)
        expected = segment_image(servable, Image.open(path).convert("RGB")).argmax(0).numpy()
        assert np.array_equal(np.asarray(mask), expected)
        assert Image.open(entry["overlay"]).size == (45, 37)
        assert sum(entry["classes"].values()) == pytest.approx(1.0, abs=1e-3)
    for flag, needs in (("--question", "--question needs a VQA checkpoint"),
                        ("--statement", "--statement needs an NLVR2 checkpoint")):  # the flag given is the one named
        with pytest.raises(SystemExit):
            predict(["--checkpoint", str(out / "checkpoint-best.pth"), "--input", str(folder), flag, "what?"])
        assert needs in capsys.readouterr().err


def test_onnx_export_takes_any_size_and_serves_the_same_masks(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    from serving import open_servable
    from serving.segmentation import segment_image
    from util.export import main as export

    data, out, _ = trained
    diffs = export(["--checkpoint", str(out / "checkpoint-best.pth"), "--format", "onnx", "--output",
                    str(tmp_path / "onnx")])
    assert diffs["segmenter"] < 1e-4  # checked by the export at another size than the traced one
    exported, original = open_servable(str(tmp_path / "onnx")), open_servable(str(out / "checkpoint-best.pth"))
    assert exported.has_segmenter and exported.num_classes == 5 + len(ABSENT)
    image = Image.open(sorted((data / "images" / "validation").glob("*.png"))[0]).convert("RGB").resize((50, 41))
    ours, theirs = segment_image(original, image), segment_image(exported, image)
    assert (ours - theirs).abs().max() < 1e-4
    assert torch.equal(ours.argmax(0), theirs.argmax(0))


def test_one_image_batches_are_refused_with_the_reason(tmp_path):
    data = write_synthetic_segmentation(tmp_path / "data", 4, 2, size=32)
    with pytest.raises((UserError, SystemExit)):
        finetune_main(TINY[:-2] + ["--data_path", str(data), "--batch_size", "1", "--output_dir", str(tmp_path / "o")])


def test_fine_tuning_at_another_crop_size_interpolates_positions_and_keeps_the_head(trained, tmp_path, capsys):
    data, out, _ = trained
    finetune_main(["--task", "semantic_segmentation", "--data_path", str(data), "--input_size", "48",
                           "--finetune", str(out / "checkpoint-best.pth"), "--epochs", "1", "--batch_size", "8",
                           "--num_workers", "0", "--output_dir", str(tmp_path / "bigger"), "--print_freq", "1000"])
    ckpt = read_model_checkpoint(str(tmp_path / "bigger" / "checkpoint-best.pth"))
    assert ckpt.backbone_config["img_size"] == 48 and ckpt.info["heads"]["seg_head"]["channels"] == 16
    assert ckpt.info["segmentation_inference"]["stride"] == 32
    assert "loaded: backbone (72 tensors), seg_head" in capsys.readouterr().out


@pytest.mark.slow  # 40 s; the other segmentation CLI tests stay in the default suite
def test_fine_tuning_learns_more_than_the_all_background_answer(tmp_path):
    """A few epochs separate the shapes from the background: mIoU above predicting class 0
    everywhere, on held-out scenes."""
    from experiments.segmentation_experiment import all_background

    data = write_synthetic_segmentation(tmp_path / "data", 320, 40, size=64)  # 8x8 patches: objects span several
    stats = finetune_main(TINY + ["--data_path", str(data), "--input_size", "64", "--batch_size", "16", "--epochs", "6",
                                  "--decoder_channels", "64", "--aux_channels", "32", "--lr", "1e-3", "--warmup_epochs",
                                  "0.25", "--min_lr", "5e-4", "--output_dir", str(tmp_path / "run")])
    baseline = all_background(data, 5)
    assert stats["best_mIoU"] > baseline["mIoU"] + 3, (stats["best_mIoU"], baseline)
    assert stats["test_IoU.background"] > 80
