"""The registry of pretraining data readers (custom_datasets/sources/): every reader file is
registered, each data kind's usual flags pick the reader they name, and flags that no reader takes
are refused in one sentence before any work (a pairs mode on a plain image folder was a KeyError
deep in the loader)."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from custom_datasets.sources import SOURCES, source_for
from main_pretrain_cook import main as pretrain
from tests.test_bad_inputs import images, refused
from tests.test_pretrain_cli import TINY_BASE
from training.cli import pretrain_config_from_argv

SOURCES_DIR = Path(__file__).resolve().parents[1] / "custom_datasets" / "sources"


def test_every_reader_file_is_in_the_registry():
    files = {p.stem for p in SOURCES_DIR.glob("*.py")} - {"__init__", "base"}
    registered = {importlib.import_module(f"custom_datasets.sources.{name}").SOURCE for name in files}
    assert registered == set(SOURCES) and len(SOURCES) == len(files)


def _picked(tmp_path: Path, *flags: str) -> str:
    cfg = pretrain_config_from_argv(TINY_BASE + list(flags) + ["--output_dir", str(tmp_path / "run")])
    return source_for(cfg.data_config, cfg.mode.data_kind).name


def test_each_kind_reads_what_its_flags_name(tmp_path):
    folder = images(tmp_path / "photos", ["a.png", "b.png"])
    captions = tmp_path / "captions.json"
    captions.write_text('[{"caption": "a red cube"}]')
    pairs = tmp_path / "pairs.json"
    pairs.write_text('[{"image": "a.png", "caption": "a red cube"}]')
    assert _picked(tmp_path, "--data_path", "synthetic") == "synthetic"
    assert _picked(tmp_path, "--data_path", str(folder)) == "image folder"
    assert _picked(tmp_path, "--data_path", f"{folder}::{folder}") == "mixed image folders"
    assert _picked(tmp_path, "--exp_name", "text_mlm", "--data_path", "synthetic") == "synthetic"
    assert _picked(tmp_path, "--exp_name", "text_mlm", "--data_file_path", str(captions)) == "caption files"
    # the run's own captions come before the synthetic world's
    assert _picked(tmp_path, "--exp_name", "text_mlm", "--data_path", "synthetic", "--data_file_path",
                   str(captions)) == "caption files"
    assert _picked(tmp_path, "--exp_name", "image_text_itc", "--data_path", str(folder), "--data_file_path",
                   str(pairs)) == "pair files"
    assert _picked(tmp_path, "--exp_name", "image_text_itc", "--data_path", "synthetic") == "synthetic"


@pytest.mark.parametrize("exp,kind", [("image_text_itc", "image-caption pairs"), ("compound_pretrain",
                                                                                  "image-caption pairs")])
def test_a_pairs_mode_on_a_plain_image_folder_is_refused_before_any_work(tmp_path, capsys, exp, kind):
    folder = images(tmp_path / "photos", ["a.png", "b.png"])
    out = tmp_path / "run"
    text = refused(lambda: pretrain(TINY_BASE + ["--exp_name", exp, "--data_path", str(folder), "--epochs", "1",
                                            "--output_dir", str(out)]),
                   f"--data_path {folder} alone holds no {kind}", "--data_file_path PAIRS.json", "--webdataset",
                   capsys=capsys)
    assert "Traceback" not in text and "\n" not in text.strip()
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("value", [3, [3, 2, 1], "3,2", "r,g,b"])
def test_bands_as_a_config_file_may_give_them_are_one_sentence(value):
    """A YAML `bands:` may be a number or a list, not the comma-separated text the flag takes."""
    from common.errors import UserError
    from custom_datasets.sources.image_folder import parse_bands

    with pytest.raises(UserError, match=r"^--bands "):
        parse_bands(value)
    assert parse_bands("3,2,1") == [3, 2, 1]


def test_the_run_says_what_it_reads_as_its_reader_describes_it(tmp_path):
    from training.pretrain import data_description

    folder = images(tmp_path / "photos", ["a.png", "b.png"])
    pairs = tmp_path / "pairs.json"
    pairs.write_text('[{"image": "a.png", "caption": "a red cube"}]')

    def said(*flags: str) -> str:
        return data_description(pretrain_config_from_argv(TINY_BASE + list(flags) + ["--output_dir", str(tmp_path)]))

    assert said("--data_path", "synthetic") == "images of the embedded synthetic world"
    assert said("--data_path", f"{folder}::{folder}") == f"images in {folder}::{folder}"
    assert said("--exp_name", "image_text_itc", "--data_path", str(folder), "--data_file_path", str(pairs)) \
        == f"image-text pairs in {pairs} (images under {folder})"
    assert said("--exp_name", "image_text_itc", "--data_path", "synthetic", "--data_file_path", str(pairs)) \
        == f"image-text pairs in {pairs}"
    assert said("--exp_name", "image_text_itc", "--webdataset", "--data_path",
                "https://user:secret@host/{00000..00003}.tar", "--train_num_samples", "8", "--eval_data_file_path",
                str(pairs)) == "image-text pairs in the WebDataset shards https://user:***@host/{00000..00003}.tar"
