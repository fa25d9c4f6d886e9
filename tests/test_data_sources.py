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


def test_each_reader_refuses_what_it_cannot_read_at_the_flag_check(tmp_path):
    """A reader's own rules (held-out pairs of shards, weights of one folder, one image root) are
    asked of the reader the flags pick, when the flags are read: before a folder, tokenizer or shard
    is touched (the shards' missing held-out pairs used to surface only once the loader was built)."""
    from common.errors import UserError

    folder = images(tmp_path / "photos", ["a.png", "b.png"])
    captions = tmp_path / "captions.json"
    captions.write_text('[{"caption": "a red cube"}]')
    cases = [
        (["--exp_name", "image_text_itc", "--webdataset", "--data_path", "https://host/{0..3}.tar",
          "--train_num_samples", "8"], "--webdataset needs held-out pairs"),
        (["--data_path", str(folder), "--data_weights", "3"], "--data_weights mixes several sources"),
        (["--data_path", f"{folder}::{folder}", "--eval_data_path", str(folder)],
         "--eval_data_path with several --data_path sources"),
        (["--data_path", f"{folder}::{folder}", "--data_weights", "1"], "--data_weights has 1 values for 2 sources"),
        (["--exp_name", "text_mlm", "--data_path", f"{folder}::{folder}", "--data_file_path", str(captions)],
         '--data_path "A::B" mixes image folders; text data is read from files'),
        (["--data_path", str(folder), "--bands", "3,2"], "--bands 3,2 must name exactly three bands"),
    ]
    for flags, sentence in cases:
        with pytest.raises(UserError) as info:
            pretrain_config_from_argv(TINY_BASE + flags + ["--output_dir", str(tmp_path / "run")])
        assert sentence in str(info.value), (flags, str(info.value))
    assert not (tmp_path / "run").exists()


def test_the_paths_a_reader_opens_are_checked_and_the_worlds_name_is_not_a_path(tmp_path):
    from common.errors import UserError

    pairs = tmp_path / "pairs.json"
    pairs.write_text('[{"image": "a.png", "caption": "a red cube"}]')
    with pytest.raises(UserError, match="--data_path /no/images does not exist"):
        pretrain_config_from_argv(TINY_BASE + ["--exp_name", "image_text_itc", "--data_path", "/no/images",
                                               "--data_file_path", str(pairs), "--output_dir", str(tmp_path / "r")])
    with pytest.raises(UserError, match="--eval_data_path /no/held_out does not exist"):
        pretrain_config_from_argv(TINY_BASE + ["--data_path", "synthetic", "--eval_data_path", "/no/held_out",
                                               "--output_dir", str(tmp_path / "r")])
    # the world's name is not a folder, for every kind that reads it beside a run's own files
    cfg = pretrain_config_from_argv(TINY_BASE + ["--exp_name", "image_text_itc", "--data_path", "synthetic",
                                                 "--data_file_path", str(pairs), "--output_dir", str(tmp_path / "r")])
    assert source_for(cfg.data_config, "pair").name == "pair files"
