"""The small-data fine-tuning recipe: chosen by the training folder's size, explicit flags and
--config winning over it, and checkpoint-best chosen on a split of the training images that is
disjoint from both the images trained on and the val set it reports."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from common.checkpoint_io import read_checkpoint, save_weights
from common.errors import UserError
from custom_datasets.classification_data import build_classification_datasets
from custom_datasets.settings import FinetuneDataSettings
from main_finetune import main as finetune
from models import create_model
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
                      "--checkpoint_epoch", "best", "--output_dir", str(out)] + FAST)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert {"selection_acc1", "test_acc1"} <= set(log[0])
    chosen = max(range(3), key=lambda e: (log[e]["selection_acc1"], -e))  # first epoch of the highest value
    best = read_checkpoint(out / "checkpoint-best.pth")
    assert best.extra["test_acc1"] == pytest.approx(log[chosen]["test_acc1"])
    assert best.extra["selection_acc1"] == pytest.approx(log[chosen]["selection_acc1"])
    assert stats["best_epoch"] == chosen and stats["best_acc1"] == pytest.approx(log[chosen]["test_acc1"])
    text = capsys.readouterr().out
    assert "recipe small_data" in text and "best epoch chosen on" in text and "training images held out" in text


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    from main_pretrain_cook import main as pretrain
    from tests.test_pretrain_cli import SYNTH, TINY

    out = tmp_path_factory.mktemp("mim")
    pretrain(TINY + SYNTH + ["--epochs", "1", "--output_dir", str(out)])
    return out / "checkpoint-0.pth"


def test_transfer_experiment_prints_seeds_baselines_majority_and_a_verdict(folders, tiny_pretrained, tmp_path, capsys):
    from experiments.transfer_experiment import main as transfer

    results = transfer(["--pretrained", str(tiny_pretrained), "--data_path", str(folders), "--seeds", "0", "1",
                        "--finetune_epochs", "1", "--probe_epochs", "2", "--num_workers", "0",
                        "--finetune_flags", "--blr 1e-2", "--output_dir", str(tmp_path / "t")])
    assert all(len(results[init]) == 2 for init in ("pretrained", "random init"))
    args = yaml.safe_load((tmp_path / "t" / "pretrained_seed0" / "finetune" / "args.yaml").read_text())
    assert args["blr"] == 0.01  # --finetune_flags reached the fine-tuning runs
    baselines = results["baselines"]
    assert set(baselines) == {f"{kind} on {features}" for kind in ("logistic regression", "k-nearest neighbours")
                              for features in ("raw pixels", "random-init features")}
    assert len(baselines["logistic regression on raw pixels"]) == 1  # nothing random in pixels
    assert len(baselines["k-nearest neighbours on random-init features"]) == 2  # one random init per seed
    counts = [len(list(d.iterdir())) for d in (folders / "val").iterdir()]
    table = capsys.readouterr().out
    assert f"| majority class | {100 * max(counts) / sum(counts):.1f} | |" in table and " ± " in table
    assert "| logistic regression on raw pixels | " in table and results["verdict"] in table
    assert "best possible" not in table  # only known for the synthetic world
    saved = json.loads((tmp_path / "t" / "results.json").read_text())
    assert saved["pretrained"][1] == results["pretrained"][1]
    assert {"loss_first", "finetune_train"} <= set(saved["pretrained"][0])


def test_transfer_experiment_on_the_synthetic_world_reports_its_ceiling(tiny_pretrained, tmp_path, monkeypatch, capsys):
    import experiments.transfer_experiment as experiment
    from custom_datasets.synthetic_classification import best_possible_accuracy, scenes

    monkeypatch.setattr(experiment, "SYNTHETIC_SIZES", (40, 30))
    results = experiment.main(["--pretrained", str(tiny_pretrained), "--data_path", "synthetic", "--seeds", "0",
                               "--finetune_epochs", "1", "--probe_epochs", "1", "--num_workers", "0",
                               "--output_dir", str(tmp_path / "t")])
    images = sorted((tmp_path / "t" / "synthetic_data" / "val").rglob("*.png"))
    assert len(images) == 30 and len(list((tmp_path / "t" / "synthetic_data" / "train").rglob("*.png"))) == 40
    ceiling = best_possible_accuracy([s for _, s in scenes("val", 30, 1, False)])
    assert 50.0 < ceiling < 100.0 and results["best_possible"] == ceiling
    assert f"| best possible (ambiguous scenes are a coin flip) | {ceiling:.1f} | |" in capsys.readouterr().out


def test_the_verdict_needs_a_margin_larger_than_the_seed_spread():
    from experiments.transfer_experiment import verdict

    runs = lambda *values: [{"finetune": v} for v in values]  # noqa: E731
    pixels = {"logistic regression on raw pixels": [{"acc1": 60.0}]}
    clear = verdict({"pretrained": runs(70, 71, 72), "random init": runs(62, 64, 66)}, pixels)
    assert "beats the best rival (fine-tuned random init, 64.0) by +7.0 points, more than" in clear
    noisy = verdict({"pretrained": runs(60, 70, 80), "random init": runs(62, 64, 66)}, pixels)
    assert "does not clearly beat the best rival (fine-tuned random init, 64.0): +6.0 points, within" in noisy
    assert "raw pixels, 60.0) by +10.0" in verdict({"pretrained": runs(70, 70, 70), "random init": runs(50, 50, 50)},
                                                    pixels)


def test_the_linear_probe_takes_only_the_selection_split_and_chooses_its_best_epoch_there(folders, tmp_path):
    cfg = config(folders, "--task", "linear_probe")
    assert cfg.data.model_selection_fraction == 0.2 and cfg.optim.batch_size == 64 and cfg.optim.blr == 0.1
    out = tmp_path / "lp"
    stats = finetune(["--task", "linear_probe", "--data_path", str(folders), "--epochs", "6", "--checkpoint_epoch",
                      "best", "--output_dir", str(out)] + FAST)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    chosen = max(range(6), key=lambda e: (log[e]["selection_acc1"], -e))
    assert stats["epoch"] == chosen and stats["best_acc1"] == pytest.approx(log[chosen]["test_acc1"])
    assert stats["last_acc1"] == pytest.approx(log[-1]["test_acc1"])
    last = finetune(["--task", "linear_probe", "--data_path", str(folders), "--epochs", "6", "--output_dir",
                     str(tmp_path / "lp_last")] + FAST)  # the recipe's default: the last epoch, reported as such
    assert last["epoch"] == 5 and last["best_acc1"] == last["last_acc1"]


def test_the_recipe_keeps_and_reports_the_last_epoch(folders, tmp_path, capsys):
    out = tmp_path / "ft"
    stats = finetune(["--task", "image_classification", "--data_path", str(folders), "--epochs", "3",
                      "--output_dir", str(out)] + FAST)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    best = read_checkpoint(out / "checkpoint-best.pth")
    assert best.extra["epoch"] == 2 and best.extra["test_acc1"] == pytest.approx(log[-1]["test_acc1"])
    assert stats["best_epoch"] == 2 and stats["best_acc1"] == pytest.approx(log[-1]["test_acc1"])
    assert "selection_acc1" in log[-1] and "train_acc1" in log[-1]  # the monitor and the fit are still logged
    assert "the last epoch kept and reported" in capsys.readouterr().out


@pytest.mark.slow
def test_the_small_data_recipe_fits_a_small_training_set(tmp_path):
    """160 one-object scenes of 8 colours at 32 px, random init, the recipe's defaults (30 epochs):
    the model classifies its own training images near perfectly (94% measured with a fifth of them
    held out for selection). The recipe before this one (blr 3e-3, crops down to 8% of the image)
    ended at 50% top-1 on its training views, loss 1.65."""
    from custom_datasets.synthetic_classification import write_synthetic_classification

    root = write_synthetic_classification(tmp_path / "data", 160, 16, 32, single_object=True)
    common = ["--task", "image_classification", "--data_path", str(root), "--input_size", "32", "--patch_size", "8",
              "--num_workers", "0", "--print_freq", "1000"]
    finetune(common + ["--model_selection_fraction", "0", "--output_dir", str(tmp_path / "ft")])  # all 160 train
    log = [json.loads(line) for line in (tmp_path / "ft" / "log.txt").read_text().splitlines()]
    assert len(log) == 30 and log[-1]["train_acc1"] >= 80.0 and log[-1]["train_loss"] < 0.7  # augmented views
    fit = finetune(common + ["--eval", "--finetune", str(tmp_path / "ft" / "checkpoint-best.pth"), "--eval_data_path",
                             str(root / "train"), "--output_dir", str(tmp_path / "eval")])
    assert fit["acc1"] >= 90.0  # the training images themselves, in the held-out view


def test_a_linear_probe_warm_start_holds_the_backbone_still_then_frees_it(folders, tmp_path):
    """LP-FT: with --lp_epochs covering the whole run only the heads move; with one of two epochs
    the backbone moves too (in the second)."""
    init = create_model("vlmo_tiny_patch16", img_size=32, patch_size=8)
    save_weights(tmp_path / "init.safetensors", {f"backbone.{k}": v for k, v in init.state_dict().items()},
                 init.cfg.to_dict())

    def run(name: str, lp_epochs: str) -> tuple[bool, bool]:
        """(the backbone moved, the heads moved)"""
        finetune(["--task", "image_classification", "--data_path", str(folders), "--epochs", "2", "--lp_epochs",
                  lp_epochs, "--finetune", str(tmp_path / "init.safetensors"), "--output_dir", str(tmp_path / name)]
                 + FAST)
        weights = read_checkpoint(tmp_path / name / "checkpoint-best.pth").model
        backbone = any(not torch.equal(weights[f"backbone.{k}"], v) for k, v in init.state_dict().items())
        return backbone, not torch.equal(weights["pooler_norm.weight"], torch.ones_like(weights["pooler_norm.weight"]))

    assert run("held", "2") == (False, True)
    assert run("freed", "1") == (True, True)


def test_the_verdict_without_random_init_compares_with_the_baselines_only():
    from experiments.transfer_experiment import verdict

    result = verdict({"pretrained": [{"finetune": 70.0}, {"finetune": 72.0}]},
                     {"k-nearest neighbours on raw pixels": [{"acc1": 60.0}]})
    assert "beats the best rival (k-nearest neighbours on raw pixels, 60.0) by +11.0 points" in result


def test_an_experiment_run_is_reused_when_finished_and_set_aside_when_interrupted(tmp_path):
    from experiments.experiment_runs import finished_or_run

    calls = []
    run = lambda: calls.append(1) or {"acc": 71.5}  # noqa: E731
    folder = tmp_path / "pretrained_seed0"
    folder.mkdir()
    (folder / "log.txt").write_text("an interrupted run's line\n")
    assert finished_or_run(folder, run) == {"acc": 71.5} and len(calls) == 1
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("pretrained_seed0.interrupted-")]
    assert len(aside) == 1 and (aside[0] / "log.txt").read_text() == "an interrupted run's line\n"  # nothing lost
    assert finished_or_run(folder, run) == {"acc": 71.5} and len(calls) == 1  # reused, not run again


def test_an_experiment_run_made_with_other_flags_is_set_aside_not_reused(tmp_path):
    """The same seed's folder asked for with other flags (another --probe_flags, more epochs) runs
    again, the old run kept aside; the same flags reuse it; a result saved before settings were
    recorded is reused as it was."""
    from experiments.experiment_runs import SETTINGS, finished_or_run, result_settings

    results = iter([{"acc": 60.0}, {"acc": 64.0}])
    folder = tmp_path / "pretrained_seed0"
    assert finished_or_run(folder, lambda: next(results), ["--epochs", "30"]) == {"acc": 60.0}
    assert finished_or_run(folder, lambda: {"acc": -1.0}, ["--epochs", "30"]) == {"acc": 60.0}  # reused
    assert finished_or_run(folder, lambda: next(results), ["--epochs", "30", "--use_cls"]) == {"acc": 64.0}
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("pretrained_seed0.other-settings-")]
    assert len(aside) == 1 and json.loads((aside[0] / "run_result.json").read_text()) == {"acc": 60.0}  # kept
    (folder / SETTINGS).unlink()  # as written before settings were recorded
    assert finished_or_run(folder, lambda: {"acc": -1.0}, ["--epochs", "90"]) == {"acc": 64.0}
    assert result_settings(["--epochs", "30", "--num_workers", "4", "--use_cls", "--print_freq", "5"]) == [
        "--epochs", "30", "--use_cls"]  # loader processes and printing change no figure


def test_the_targets_experiment_runs_in_phases_with_random_init_once(tmp_path, monkeypatch):
    """Every target's pretraining, then every transfer, then every segmentation (the longest step last),
    and the random-init rows of both downstream steps with the first target only."""
    import experiments.targets_experiment as experiment

    steps, seeds, commands = [], {}, {}

    def fake_run(argv, log, done):  # as experiment.run: a finished step is reused
        if done.exists():
            return 0.0
        script, flags = argv[0].rsplit("/", 1)[-1], argv[1:]
        target = log.parent.name
        steps.append((script, target, "--skip_random_init" in flags))
        commands[(script, target)] = flags
        if "--seeds" in flags:  # the values up to the next flag
            rest = flags[flags.index("--seeds") + 1:]
            seeds[script] = rest[:next((i for i, f in enumerate(rest) if f.startswith("--")), len(rest))]
        done.parent.mkdir(parents=True, exist_ok=True)
        if script == "main_pretrain_cook.py":
            (done.parent / "log.txt").write_text(json.dumps({"test_acc_mim": 0.5}) + "\n")
        key = "finetune" if script == "transfer_experiment.py" else "best_mIoU"
        n = len(seeds.get(script, [0]))  # one row per seed, as the experiments write them
        rows = {"pretrained": [{key: 1.0, "probe": 2.0}] * n}
        if "--skip_random_init" not in flags:
            rows["random init"] = [{key: 0.5, "probe": 0.5}] * n
        done.write_text(json.dumps(rows))
        return 1.0

    monkeypatch.setattr(experiment, "run", fake_run)
    monkeypatch.setattr(experiment, "write_random_dall_e", lambda folder, seed: None)
    teacher = tmp_path / "teacher.pth"
    teacher.write_bytes(b"")
    experiment.main(["--teacher", str(teacher), "--targets", "kmeans", "dall-e", "--output_dir", str(tmp_path / "out")])
    assert steps == [("main_pretrain_cook.py", "kmeans", False), ("main_pretrain_cook.py", "dall-e", False),
                     ("transfer_experiment.py", "kmeans", False), ("transfer_experiment.py", "dall-e", True),
                     ("segmentation_experiment.py", "kmeans", False), ("segmentation_experiment.py", "dall-e", True)]
    # transfer over three seeds, segmentation (the longest runs) over the segmentation experiment's one
    assert seeds == {"transfer_experiment.py": ["0", "1", "2"], "segmentation_experiment.py": ["0"]}
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| dall-e | 0.500 | 1.0 ± 0.0 | 2.0 ± 0.0 | 1.0 |" in table
    assert "| random init | | 0.5 ± 0.0 | 0.5 ± 0.0 | 0.5 |" in table

    steps.clear()  # more segmentation seeds: the one-seed summary is set aside, not taken for theirs
    experiment.main(["--teacher", str(teacher), "--targets", "kmeans", "dall-e", "--seg_seeds", "0", "1",
                     "--output_dir", str(tmp_path / "out")])
    assert [s for s, _, _ in steps] == ["segmentation_experiment.py"] * 2
    assert seeds["segmentation_experiment.py"] == ["0", "1"]
    assert (tmp_path / "out" / "kmeans" / "segmentation" / "results.1-seeds.json").is_file()
    assert "| kmeans | 0.500 | 1.0 ± 0.0 | 2.0 ± 0.0 | 1.0 ± 0.0 |" in (tmp_path / "out" / "table.md").read_text()

    steps.clear()  # --steps transfer: no segmentation (a photo backbone's run), its cells blank
    experiment.main(["--teacher", str(teacher), "--targets", "kmeans", "--steps", "transfer", "--output_dir",
                     str(tmp_path / "photos")])
    assert [script for script, _, _ in steps] == ["main_pretrain_cook.py", "transfer_experiment.py"]
    table = (tmp_path / "photos" / "table.md").read_text()
    assert "| kmeans | 0.500 | 1.0 ± 0.0 | 2.0 ± 0.0 |  |" in table and "| random init | | 0.5 ± 0.0 | 0.5 ± 0.0 |  |" in table

    steps.clear()  # a row with BEiT v2's patch aggregation beside the finished plain rows: only its own steps run
    experiment.main(["--teacher", str(teacher), "--targets", "kmeans", "dall-e", "kmeans+agg", "--seg_seeds", "0", "1",
                     "--output_dir", str(tmp_path / "out")])
    assert steps == [("main_pretrain_cook.py", "kmeans_agg", False), ("transfer_experiment.py", "kmeans_agg", True),
                     ("segmentation_experiment.py", "kmeans_agg", True)]
    mim = commands[("main_pretrain_cook.py", "kmeans_agg")]
    assert mim[mim.index("--d_vae_type") + 1] == "kmeans" and mim[mim.index("--early_layers") + 1] == "3"
    assert "| kmeans+agg | 0.500 | 1.0 ± 0.0 | 2.0 ± 0.0 | 1.0 ± 0.0 |" in (tmp_path / "out" / "table.md").read_text()


def test_finetune_flags_take_a_single_flag_as_their_value():
    from experiments.transfer_experiment import flags_value_joined, parser

    for value in ("--use_cls", "--lp_epochs 5"):
        args = parser().parse_args(flags_value_joined(["--pretrained", "p", "--data_path", "d", "--finetune_flags",
                                                       value, "--seeds", "0"]))
        assert args.finetune_flags == value and args.seeds == [0]
        args = parser().parse_args(flags_value_joined(["--pretrained", "p", "--data_path", "d", "--probe_flags", value]))
        assert args.probe_flags == value
