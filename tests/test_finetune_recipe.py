"""The small-data fine-tuning recipe: chosen by the training folder's size, explicit flags and
--config winning over it, and checkpoint-best chosen on a split of the training images that is
disjoint from both the images trained on and the val set it reports."""
from __future__ import annotations

import json

import pytest

from common.checkpoint_io import read_checkpoint
from common.errors import UserError
from custom_datasets.classification_data import build_classification_datasets
from custom_datasets.settings import FinetuneDataSettings
from main_finetune import main as finetune
from tests.helpers import colour_folders
from tests.test_finetune import FAST
from training import recipes
from training.cli import finetune_config_from_argv


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return colour_folders(tmp_path_factory.mktemp("colours"), 60, 16, render_size=32)


def config(folders, *extra: str):
    return finetune_config_from_argv(["--task", "image_classification", "--data_path", str(folders), *extra])


def test_auto_picks_small_data_below_the_limit_and_beit_above(folders, monkeypatch, capsys):
    small = config(folders)
    assert small.augment.recipe == "small_data"
    assert (small.augment.mixup, small.augment.cutmix, small.augment.aa, small.augment.reprob) == (0.0, 0.0, "", 0.0)
    assert (small.optim.batch_size, small.model.layer_decay, small.data.model_selection_fraction) == (16, 0.75, 0.2)
    assert "recipe small_data (60 training images (fewer than 5000))" in capsys.readouterr().out
    monkeypatch.setattr(recipes, "SMALL_DATA_IMAGES", 60)
    large = config(folders)
    assert large.augment.recipe == "beit" and large.augment.mixup == 0.8 and large.optim.batch_size == 64
    assert large.data.model_selection_fraction == 0.0


def test_explicit_flags_and_config_win_over_the_recipe(folders, tmp_path):
    cfg = config(folders, "--mixup", "0.3", "--batch_size", "8", "--model_selection_fraction", "0")
    assert cfg.augment.recipe == "small_data" and cfg.augment.mixup == 0.3 and cfg.optim.batch_size == 8
    assert cfg.data.model_selection_fraction == 0.0 and cfg.augment.cutmix == 0.0
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("layer_decay: 0.5\n")
    assert config(folders, "--config", str(yaml_file)).model.layer_decay == 0.5
    beit = config(folders, "--recipe", "beit")
    assert beit.augment.mixup == 0.8 and beit.optim.batch_size == 64 and beit.data.model_selection_fraction == 0.0


@pytest.mark.parametrize("argv, message", [
    (["--task", "text_classification", "--recipe", "small_data"], "--recipe applies to --task image_classification"),
    (["--task", "text_classification", "--model_selection_fraction", "0.2"], "--model_selection_fraction applies to"),
    (["--task", "image_classification", "--model_selection_fraction", "1.5"], "must be in [0, 1)"),
])
def test_recipe_flags_outside_their_task_are_refused(folders, argv, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
        finetune_config_from_argv(argv + ["--data_path", str(folders), "--data_file_path", __file__])


def test_the_selection_split_is_disjoint_deterministic_and_seen_with_the_held_out_view(folders):
    settings = FinetuneDataSettings(data_path=str(folders), model_selection_fraction=0.25)
    train, val, selection = build_classification_datasets(settings, "train-view", "eval-view")
    train_files = {str(train.path(i)) for i in range(len(train))}
    selection_files = {str(selection.path(i)) for i in range(len(selection))}
    assert not train_files & selection_files and len(train_files | selection_files) == 60
    assert 5 <= len(selection_files) <= 25  # a quarter of 60, by file-name hash
    assert selection.build.transform == "eval-view" and train.build.transform == "train-view"
    again = build_classification_datasets(settings, "train-view", "eval-view")[2]
    assert {str(again.path(i)) for i in range(len(again))} == selection_files
    assert len(build_classification_datasets(FinetuneDataSettings(data_path=str(folders)), "t", "e")[0]) == 60


def test_best_is_chosen_on_the_selection_split_and_reports_val(folders, tmp_path, capsys):
    out = tmp_path / "ft"
    stats = finetune(["--task", "image_classification", "--data_path", str(folders), "--epochs", "3", "--blr", "2e-2",
                      "--output_dir", str(out)] + FAST)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert {"selection_acc1", "test_acc1"} <= set(log[0])
    chosen = max(range(3), key=lambda e: (log[e]["selection_acc1"], -e))  # first epoch of the highest value
    best = read_checkpoint(out / "checkpoint-best.pth")
    assert best.extra["test_acc1"] == pytest.approx(log[chosen]["test_acc1"])
    assert best.extra["selection_acc1"] == pytest.approx(log[chosen]["selection_acc1"])
    assert stats["best_epoch"] == chosen and stats["best_acc1"] == pytest.approx(log[chosen]["test_acc1"])
    text = capsys.readouterr().out
    assert "recipe small_data" in text and "best epoch chosen on" in text and "training images held out" in text


def test_transfer_experiment_prints_seeds_majority_and_loss(folders, tmp_path, capsys):
    from main_pretrain_cook import main as pretrain
    from tests.test_pretrain_cli import SYNTH, TINY
    from util.transfer_experiment import main as transfer

    pretrain(TINY + SYNTH + ["--epochs", "1", "--output_dir", str(tmp_path / "mim")])
    results = transfer(["--pretrained", str(tmp_path / "mim" / "checkpoint-0.pth"), "--data_path", str(folders),
                        "--seeds", "0", "1", "--finetune_epochs", "1", "--probe_epochs", "2", "--num_workers", "0",
                        "--output_dir", str(tmp_path / "t")])
    assert set(results) == {"pretrained", "random init"} and all(len(runs) == 2 for runs in results.values())
    counts = [len(list(d.iterdir())) for d in (folders / "val").iterdir()]
    table = capsys.readouterr().out
    assert f"| majority class | {100 * max(counts) / sum(counts):.1f} |" in table and " ± " in table
    saved = json.loads((tmp_path / "t" / "results.json").read_text())
    assert saved["pretrained"][1] == results["pretrained"][1] and {"loss_first", "probe_last"} <= set(saved["pretrained"][0])


def test_the_linear_probe_takes_only_the_selection_split_and_chooses_its_best_epoch_there(folders, tmp_path):
    cfg = config(folders, "--task", "linear_probe")
    assert cfg.data.model_selection_fraction == 0.2 and cfg.optim.batch_size == 64 and cfg.optim.blr == 0.1
    out = tmp_path / "lp"
    stats = finetune(["--task", "linear_probe", "--data_path", str(folders), "--epochs", "6", "--output_dir",
                      str(out)] + FAST)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    chosen = max(range(6), key=lambda e: (log[e]["selection_acc1"], -e))
    assert stats["epoch"] == chosen and stats["best_acc1"] == pytest.approx(log[chosen]["test_acc1"])
    assert stats["last_acc1"] == pytest.approx(log[-1]["test_acc1"])
