"""Inputs are validated before the output folder: re-running a command into a folder that holds a
run with a wrong --data_path names the data path, not the folder; and the folder is left as it was."""
from __future__ import annotations

import pytest

from main_finetune import main as finetune
from main_pretrain_cook import main as pretrain
from tests.helpers import colour_folders
from tests.test_finetune import FAST
from tests.test_pretrain_cli import TINY


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return colour_folders(tmp_path_factory.mktemp("shapes"), 16, 8, render_size=32)


@pytest.mark.parametrize("data", ["missing", "empty", "file"])
def test_pretraining_into_a_taken_folder_reports_the_data_path(tmp_path, capsys, shapes, data):
    taken = tmp_path / "run"
    taken.mkdir()
    (taken / "checkpoint-4.pth").write_bytes(b"another run's checkpoint")
    (taken / "file_index.txt").write_text("another run's index\n")
    before = _snapshot(taken)
    path = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "file": tmp_path / "a.txt"}[data]
    if data == "empty":
        path.mkdir()
    elif data == "file":
        path.write_text("x")
    with pytest.raises(SystemExit) as info:
        pretrain(TINY + ["--data_path", str(path), "--output_dir", str(taken), "--epochs", "1"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"--data_path {path}" in err and "already holds" not in err
    # with good data the folder is the problem, and nothing in it was touched (not even its file index)
    with pytest.raises(SystemExit):
        pretrain(TINY + ["--data_path", str(shapes / "train"), "--output_dir", str(taken), "--epochs", "1"])
    assert f"--output_dir {taken} already holds checkpoints" in capsys.readouterr().err
    assert _snapshot(taken) == before


@pytest.mark.parametrize("task", ["image_classification", "linear_probe"])
def test_finetuning_into_a_taken_folder_reports_the_data_path(tmp_path, capsys, shapes, task):
    taken = tmp_path / "ft"
    taken.mkdir()
    (taken / "log.txt").write_text('{"epoch": 0}\n')
    before = _snapshot(taken)
    wrong = tmp_path / "no_splits"
    (wrong / "cats").mkdir(parents=True)  # class folders but no train/ and val/
    with pytest.raises(SystemExit) as info:
        finetune(["--task", task, "--data_path", str(wrong), "--output_dir", str(taken), "--epochs", "1"] + FAST)
    err = capsys.readouterr().err
    assert info.value.code == 2 and str(wrong) in err and "already holds" not in err
    with pytest.raises(SystemExit):
        finetune(["--task", task, "--data_path", str(shapes), "--output_dir", str(taken), "--epochs", "1"] + FAST)
    assert f"--output_dir {taken} already holds a run" in capsys.readouterr().err
    assert _snapshot(taken) == before
