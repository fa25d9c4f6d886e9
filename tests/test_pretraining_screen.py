"""experiments/pretraining_screen.py: one pretraining run per recipe, every kept checkpoint scored with the
backbone frozen, costs measured, finished runs reused, malformed recipes refused in one sentence."""
from __future__ import annotations

import json

import pytest

from common.errors import UserError
from tests.helpers import colour_folders
from experiments import pretraining_screen as screen


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return colour_folders(tmp_path_factory.mktemp("colours"), 48, 24, render_size=64)


@pytest.mark.slow  # 32 s of pretraining runs; the recipes' parsing and the flag checks stay in the default suite
def test_each_recipe_is_run_once_and_each_checkpoint_scored(labelled, tmp_path):
    argv = ["--data_path", str(labelled / "train"), "--labelled", str(labelled), "--recipe", "base=--batch_size 16",
            "--recipe", "vocab 32=--visual_vocab_size 32 --batch_size 16", "--epochs", "2", "--every", "1",
            "--num_workers", "0", "--output_dir", str(tmp_path)]
    result = screen.main(argv)
    rows = result["rows"]
    assert [(r["recipe"], r["epochs"]) for r in rows] == [("base", 0), ("base", 1), ("base", 2), ("vocab 32", 0),
                                                         ("vocab 32", 1), ("vocab 32", 2)]
    for name, folder in (("base", "base"), ("vocab 32", "vocab_32")):
        cost = result["costs"][name]
        assert cost["cpu_seconds"] > 1 and cost["complete"]
        log = [json.loads(line) for line in (tmp_path / folder / "log.txt").read_text().splitlines()]
        last = [r for r in rows if r["recipe"] == name][-1]
        assert last["mim_acc"] == log[-1]["test_acc_mim"]
        assert last["cpu_minutes"] == pytest.approx(cost["cpu_seconds"] / 60, abs=0.05)
        assert all(0 <= r["logistic"] <= 100 and 0 <= r["knn"] <= 100 for r in rows)
    assert "visual tokenizer kmeans (32 tokens)" in (tmp_path / "vocab_32" / "output.txt").read_text()
    table = (tmp_path / "table.md").read_text()
    assert "| vocab 32 | `--visual_vocab_size 32 --batch_size 16` | 2 |" in table and "| raw pixels |" in table

    before = (tmp_path / "base" / "output.txt").read_text()
    again = screen.main(argv)  # finished runs are reused, not run again
    assert (tmp_path / "base" / "output.txt").read_text() == before and again["rows"] == rows


@pytest.mark.parametrize("spec, says", [("base", "write NAME=FLAGS"), ("a/b=--epochs 1", "write NAME=FLAGS")])
def test_a_malformed_recipe_is_refused(spec, says):
    with pytest.raises(UserError, match=says):
        screen.recipes([spec])


def test_a_recipe_given_twice_is_refused():
    with pytest.raises(UserError, match="given twice"):
        screen.recipes(["a=", "a=--epochs 2"])


def test_a_resumed_run_shows_its_cost_as_a_lower_bound():
    row = {"recipe": "a", "epochs": 10, "cpu_minutes": 3.0, "mim_acc": 0.5, "logistic": 60.0, "knn": 55.0}
    pixels = {"logistic": 50.0, "knn": 45.0}
    assert "| a | `(config)` | 10 | ≥ 3.0 | 0.500 |" in screen.table([{**row, "cpu_complete": False}], {"a": []}, pixels)
    assert "| a | `(config)` | 10 | 3.0 | 0.500 |" in screen.table([{**row, "cpu_complete": True}], {"a": []}, pixels)
