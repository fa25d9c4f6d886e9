"""Downstream modes end to end on tiny configs: fine-tuning and linear probing (synthetic class
folders and ../shared/data/hymenoptera), what --finetune loads, --eval, predict on a folder with a
corrupt file, and every export format checked against our outputs."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from common.checkpoint_io import read_checkpoint, save_weights
from custom_datasets.synthetic_world import LABELS, SyntheticWorld
from main_finetune import main as finetune
from main_pretrain_cook import main as pretrain
from models import create_model
from models.classifier import ImageClassifier
from serving import open_servable
from tests.helpers import SHARED_DATA, colour_folders, randomize_, requires_shared
from tests.test_pretrain_cli import SYNTH, TINY
from util.export import main as export
from util.predict import main as predict

FAST = ["--input_size", "32", "--patch_size", "8", "--batch_size", "8", "--num_workers", "0", "--print_freq", "100",
        "--warmup_epochs", "0.5", "--drop_path", "0"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """An ImageFolder of synthetic scenes, one folder per colour of the first object."""
    return colour_folders(tmp_path_factory.mktemp("shapes"), 48, 24, render_size=40)


def _log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_finetune_from_a_pretraining_checkpoint_then_eval_predict(tmp_path, shapes, capsys):
    pretrain(TINY + SYNTH + ["--epochs", "1", "--output_dir", str(tmp_path / "mim")])
    out = tmp_path / "ft"
    finetune(["--task", "image_classification", "--data_path", str(shapes), "--finetune",
              str(tmp_path / "mim" / "checkpoint-0.pth"), "--epochs", "2", "--model_ema", "--output_dir", str(out)] + FAST)
    text = capsys.readouterr().out
    assert "loaded: backbone" in text and "new: pooler_norm, classifier" in text and "ignored: mim_head" in text
    log = _log(out)
    assert len(log) == 2 and {"train_loss", "train_lr", "test_acc1", "test_acc5", "test_loss", "test_ema_acc1"} <= set(log[0])
    best = read_checkpoint(out / "checkpoint-best.pth")
    assert best.extra["class_names"] == sorted(p.name for p in (shapes / "train").iterdir())
    stats = finetune(["--task", "image_classification", "--data_path", str(shapes), "--eval", "--finetune",
                      str(out / "checkpoint-best.pth"), "--output_dir", str(out)] + FAST)
    assert stats["acc1"] == pytest.approx(best.extra["test_acc1"], abs=1e-6)
    assert "loaded: backbone" in capsys.readouterr().out  # and its classifier
    # predict on a folder with a corrupt file: reported, not fatal
    images = tmp_path / "in"
    images.mkdir()
    for i, path in enumerate(sorted((shapes / "val").rglob("*.png"))[:5]):
        path.rename(images / f"{i}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    result = predict(["--checkpoint", str(out / "checkpoint-best.pth"), "--input", str(images), "--output",
                      str(tmp_path / "pred.json"), "--topk", "3"])
    assert len(result["predictions"]) == 5 and list(result["errors"]) == [str(images / "broken.jpg")]
    first = next(iter(json.loads((tmp_path / "pred.json").read_text()).values()))
    assert first["label"] in LABELS and len(first["topk"]) == 3 and 0 < first["score"] <= 1
    # the ONNX export alone predicts the same: preprocessing and class names travel in its run_info.json
    export(["--checkpoint", str(out / "checkpoint-best.pth"), "--format", "onnx", "--output", str(tmp_path / "onnx")])
    from_export = predict(["--checkpoint", str(tmp_path / "onnx"), "--input", str(images), "--output",
                           str(tmp_path / "pred_onnx.json"), "--topk", "3"])
    for path, row in result["predictions"].items():
        assert from_export["predictions"][path]["label"] == row["label"]
        assert from_export["predictions"][path]["score"] == pytest.approx(row["score"], abs=1e-4)


def test_gradient_checkpointing_fine_tunes_to_the_same_weights(tmp_path, shapes, monkeypatch):
    """--grad_checkpointing recomputes activations in backward (with drop path on: the RNG is
    replayed): the same weights after an epoch, and the blocks did go through the checkpoint."""
    import models.backbone

    count, real = [0], models.backbone.checkpoint

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(models.backbone, "checkpoint", counting)
    runs, checkpointed = {}, {}
    for name, extra in (("plain", []), ("checkpointed", ["--grad_checkpointing"])):
        before = count[0]
        finetune(["--task", "image_classification", "--data_path", str(shapes), "--epochs", "1", "--output_dir",
                  str(tmp_path / name)] + FAST + ["--drop_path", "0.2"] + extra)
        runs[name] = read_checkpoint(tmp_path / name / "checkpoint-best.pth").model
        checkpointed[name] = count[0] - before
    assert checkpointed["plain"] == 0 and checkpointed["checkpointed"] % 4 == 0 < checkpointed["checkpointed"]  # 4 blocks a step
    for key, value in runs["plain"].items():
        assert torch.allclose(runs["checkpointed"][key], value, atol=1e-6, rtol=0), key
    assert _log(tmp_path / "plain")[0]["train_loss"] == pytest.approx(_log(tmp_path / "checkpointed")[0]["train_loss"],
                                                                      abs=1e-6)


def test_finetune_at_another_resolution(tmp_path, shapes):
    pretrain(TINY + SYNTH + ["--epochs", "1", "--output_dir", str(tmp_path / "mim")])
    ckpt = str(tmp_path / "mim" / "checkpoint-0.pth")
    finetune(["--task", "image_classification", "--data_path", str(shapes), "--finetune", ckpt, "--epochs", "1",
              "--output_dir", str(tmp_path / "ft48")] + FAST[2:] + ["--input_size", "48"])  # tables interpolated
    saved = read_checkpoint(tmp_path / "ft48" / "checkpoint-best.pth")
    assert saved.backbone_config["img_size"] == 48 and saved.info["preprocessing"]["image_size"] == 48


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Class folders of 320 / 96 synthetic scenes by the colour of the first object (8 classes)."""
    return colour_folders(tmp_path_factory.mktemp("colours"), 320, 96, render_size=32)


def majority_accuracy(root) -> float:
    counts = [len(list(folder.iterdir())) for folder in (root / "val").iterdir()]
    return 100 * max(counts) / sum(counts)


def test_linear_probe_learns_above_the_majority_class(tmp_path, colours):
    stats = finetune(["--task", "linear_probe", "--data_path", str(colours), "--epochs", "20", "--probe_layer", "2",
                      "--output_dir", str(tmp_path / "lp")] + FAST)
    assert len(_log(tmp_path / "lp")) == 20 and read_checkpoint(tmp_path / "lp" / "probe_head.safetensors").model
    assert stats["best_acc1"] > 2 * majority_accuracy(colours)  # measured 49.0 against 16.7


def test_the_linear_probe_reads_the_cls_token_with_use_cls(tmp_path, colours):
    """--use_cls probes the block's [CLS] token (BEiT v2's protocol for patch aggregation), not the
    mean-pooled patches; the features are exactly those tokens, and the head file says which."""
    from torchvision import datasets, transforms

    from training.linear_probe import extract_features

    backbone = create_model("vlmo_tiny_patch16", img_size=32, patch_size=8).eval()
    randomize_(backbone)
    folder = datasets.ImageFolder(colours / "val", transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()]))
    images = [{"image": x, "label": y} for x, y in folder]
    batch = torch.stack([sample["image"] for sample in images])
    captured = []
    hook = backbone.blocks[2].register_forward_hook(lambda m, i, out: captured.append(out))
    with torch.no_grad():
        backbone.encode_image(batch)
    hook.remove()
    cls, _ = extract_features(backbone, images, 2, 5, torch.device("cpu"), use_cls=True)
    pooled, _ = extract_features(backbone, images, 2, 5, torch.device("cpu"))
    assert torch.allclose(cls, captured[0][:, 0], atol=1e-6) and torch.allclose(pooled, captured[0][:, 1:].mean(1), atol=1e-6)
    assert not torch.allclose(cls, pooled, atol=1e-2)
    stats = finetune(["--task", "linear_probe", "--use_cls", "--data_path", str(colours), "--epochs", "20",
                      "--output_dir", str(tmp_path / "lp")] + FAST)
    assert read_checkpoint(tmp_path / "lp" / "probe_head.safetensors").extra["metadata"]["probe_features"] == "[CLS] token"
    assert stats["best_acc1"] > majority_accuracy(colours)


def test_image_classification_learns_above_the_majority_class(tmp_path, colours):
    finetune(["--task", "image_classification", "--data_path", str(colours), "--epochs", "4", "--blr", "2e-2",
              "--mixup", "0", "--cutmix", "0", "--aa", "", "--reprob", "0", "--layer_decay", "1.0",
              "--output_dir", str(tmp_path / "ft")] + FAST)
    log = _log(tmp_path / "ft")
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.1
    assert log[-1]["test_acc1"] > 1.5 * majority_accuracy(colours)  # measured 32.3 against 16.7 (epoch 3)


@pytest.mark.parametrize("argv, message", [
    (["--task", "text_classification"], "--task text_classification needs --data_file_path"),
    (["--task", "image_classification", "--eval"], "--eval needs --finetune"),
    (["--task", "linear_probe", "--probe_layer", "9"], "--probe_layer 9 is outside"),
    (["--task", "image_classification", "--data_path", "/nope"], "--data_path /nope does not exist"),
])
def test_finetune_flag_errors(tmp_path, shapes, capsys, argv, message):
    base = ["--data_path", str(shapes)] if "--data_path" not in argv else []
    with pytest.raises(SystemExit) as info:
        finetune(base + argv + ["--output_dir", str(tmp_path / "o")] + FAST)
    assert info.value.code == 2 and message in capsys.readouterr().err


@requires_shared
def test_hymenoptera_linear_probe_beats_the_majority_class(tmp_path):
    """Real photos, real class imbalance: features of a random backbone already separate ants from bees
    better than always answering the larger class (54.2% of the 153 val images)."""
    stats = finetune(["--task", "linear_probe", "--data_path", str(SHARED_DATA / "hymenoptera"), "--epochs", "30",
                      "--output_dir", str(tmp_path / "lp")] + FAST)
    assert stats["best_acc1"] > majority_accuracy(SHARED_DATA / "hymenoptera") + 3


def _random_classifier(tmp_path, ffn: str, use_cls: bool = False, layer_scale: float | None = 0.1):
    torch.manual_seed(0)
    backbone = create_model("vlmo_tiny_patch16", img_size=32, patch_size=8, ffn=ffn, layer_scale_init_value=layer_scale)
    model = randomize_(ImageClassifier(backbone, 3, use_cls=use_cls), scale=0.05).eval()
    path = tmp_path / f"clf_{ffn}.safetensors"
    save_weights(path, model.state_dict(), backbone.cfg.to_dict())
    return model, path


@pytest.mark.parametrize("fmt", ["onnx", "timm", "hf"])
@pytest.mark.parametrize("ffn", ["shared", "multiway"])
def test_exports_reproduce_the_classifier(tmp_path, fmt, ffn):
    model, path = _random_classifier(tmp_path, ffn)
    reloaded = open_servable(str(path)).model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))
    diffs = export(["--checkpoint", str(path), "--format", fmt, "--output", str(tmp_path / fmt)])
    assert diffs and max(diffs.values()) <= 1e-4
    if fmt == "hf":  # transformers loads the folder with no missing weights
        from transformers import BeitForImageClassification

        _, info = BeitForImageClassification.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
    if fmt == "onnx":
        assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["classifier.onnx", "image_encoder.onnx",
                                                                         "run_info.json", "text_encoder.onnx"]


@pytest.mark.parametrize("fmt", ["timm", "hf"])
def test_exports_of_a_pretrained_backbone(tmp_path, fmt):
    torch.manual_seed(0)
    backbone = randomize_(create_model("vlmo_tiny_patch16", img_size=32, patch_size=8), scale=0.05)
    path = tmp_path / "backbone.safetensors"
    save_weights(path, {f"backbone.{k}": v for k, v in backbone.state_dict().items()}, backbone.cfg.to_dict())
    diffs = export(["--checkpoint", str(path), "--format", fmt, "--output", str(tmp_path / fmt)])
    assert max(diffs.values()) <= 1e-4
    with pytest.raises(SystemExit):  # never overwritten
        export(["--checkpoint", str(path), "--format", fmt, "--output", str(tmp_path / fmt) + (".safetensors" if fmt == "timm" else "")])


@pytest.fixture(scope="module")
def word_pieces(tmp_path_factory):
    from util.train_text_tokenizer import main as train_tokenizer

    return str(train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "200", "--output",
                                str(tmp_path_factory.mktemp("tok") / "tok")]))


def LabelledTextsOf(path, fraction):
    """The held-out examples the run uses (the project's one split)."""
    from custom_datasets.labelled_text import read_labelled_texts
    from custom_datasets.split import record_keys, split_held_out

    examples = read_labelled_texts(path)
    return split_held_out(examples, record_keys(len(examples)), fraction)[1]


def test_text_classification_from_csv(tmp_path, word_pieces):
    import csv

    world = SyntheticWorld("train", 80, seed=2)
    path = tmp_path / "texts.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(80):
            scene = world.scene(i)
            writer.writerow([scene.caption, LABELS[scene.label]])
    out = tmp_path / "tc"
    stats = finetune(["--task", "text_classification", "--data_file_path", str(path), "--tokenizer", word_pieces,
                      "--epochs", "3", "--blr", "5e-2", "--layer_decay", "1.0", "--val_fraction", "0.25",
                      "--output_dir", str(out)] + FAST)
    # the label (the first object's colour) is a word of the caption: learnable in a few steps
    val_labels = [label for _, label in LabelledTextsOf(path, 0.25)]
    majority = 100 * max(val_labels.count(x) for x in set(val_labels)) / len(val_labels)
    assert stats["best_acc1"] >= 80 > majority + 20 and len(_log(out)) == 3
    names = read_checkpoint(out / "checkpoint-best.pth").extra["class_names"]
    assert names == sorted(names) and len(names) > 1 and set(names) <= set(LABELS)
    (tmp_path / "bad.csv").write_text("words,category\nhello,x\n")
    with pytest.raises(SystemExit):
        finetune(["--task", "text_classification", "--data_file_path", str(tmp_path / "bad.csv"), "--tokenizer",
                  word_pieces, "--output_dir", str(tmp_path / "bad")] + FAST)


def test_cls_classifier_exports_to_timm_and_hf_refuses_clearly(tmp_path, capsys):
    model, path = _random_classifier(tmp_path, "shared", use_cls=True)
    from common.checkpoint_io import read_checkpoint as read

    ckpt = read(path)
    torch.save({"format": "vlmo-backbone/1", "backbone_config": ckpt.backbone_config, "model": ckpt.model,
                "args": {"use_cls": True}}, tmp_path / "cls.pth")
    old_mask = os.umask(0o022)
    try:
        diffs = export(["--checkpoint", str(tmp_path / "cls.pth"), "--format", "timm", "--output", str(tmp_path / "t")])
    finally:
        os.umask(old_mask)
    assert diffs["timm"] <= 1e-4
    written = sorted(tmp_path.glob("t.*"))  # weights, kwargs and run info, readable by the team (0644, not 0600)
    assert len(written) == 3 and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in written), written
    with pytest.raises(SystemExit):
        export(["--checkpoint", str(tmp_path / "cls.pth"), "--format", "hf", "--output", str(tmp_path / "h")])
    assert "cannot be expressed as HF BeitForImageClassification" in capsys.readouterr().err


def test_parameter_efficient_fine_tuning_trains_adapters_and_head_and_loads_merged(tmp_path, shapes, capsys):
    pretrain(TINY + SYNTH + ["--epochs", "1", "--output_dir", str(tmp_path / "mim")])
    ckpt = tmp_path / "mim" / "checkpoint-0.pth"
    out = tmp_path / "peft"
    finetune(["--task", "image_classification", "--data_path", str(shapes), "--finetune", str(ckpt), "--lora_rank", "4",
              "--epochs", "2", "--output_dir", str(out)] + FAST)
    assert "LoRA rank 4 alpha 4" in capsys.readouterr().out
    before, best = read_checkpoint(ckpt), read_checkpoint(out / "checkpoint-best.pth")
    assert best.extra["lora"] == {"rank": 4, "alpha": 4}
    changed = {k for k, v in best.model.items() if k in before.model and not torch.equal(v, before.model[k])}
    assert not changed  # base weights frozen: only adapters (new keys) and the head moved
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in best.model.items())
    stats = finetune(["--task", "image_classification", "--data_path", str(shapes), "--eval", "--finetune",
                      str(out / "checkpoint-best.pth"), "--output_dir", str(out)] + FAST)
    assert stats["acc1"] == pytest.approx(best.extra["test_acc1"], abs=1e-6)  # adapters merged on load: same model
