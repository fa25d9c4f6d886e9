"""The bad inputs and edge cases a probe of the CLIs found (issue 22, part 4), each reproduced as a
user makes it: a traceback becomes one sentence naming the file or flag and the fix, a silent wrong
result becomes a refusal or a counted skip, and no file is replaced without --overwrite."""
from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
import yaml
from PIL import Image

from common.checkpoint_io import load_safetensors_file, read_checkpoint, save_safetensors
from common.errors import UserError
from custom_datasets.file_index import FileTable, index_folder
from custom_datasets.labelled_text import read_labelled_texts
from custom_datasets.text_data import read_pairs
from main_pretrain_cook import main as pretrain
from tests.test_pretrain_cli import SYNTH, TINY
from training.cli import pretrain_config_from_argv


def images(folder, names, size=16):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (size, size), (40 * i % 255, 80, 120)).save(folder / name)
    return folder


def refused(call, *message: str, capsys=None):
    with pytest.raises((UserError, SystemExit)) as info:
        call()
    text = str(info.value) if info.type is UserError else capsys.readouterr().err
    for part in message:
        assert part in text, text
    return text


# ---- image folders -------------------------------------------------------------------------------
def test_a_symlink_loop_in_the_data_is_indexed_once_and_said(tmp_path, capsys):
    root = images(tmp_path / "data" / "sub", ["a.png", "b.png"]).parent
    os.symlink("..", root / "sub" / "up")  # sub/up -> data: a loop
    os.symlink("self", root / "self")  # a link to itself: unreadable
    assert sorted(index_folder(root)) == ["sub/a.png", "sub/b.png"]
    out = capsys.readouterr().out
    assert "skipped 1 link(s) to folders already indexed" in out and "'sub/up'" in out
    assert "could not be read" in out and "'self'" in out


def test_any_file_name_survives_the_cached_index(tmp_path):
    """A name may hold a newline, or bytes that are not UTF-8: a resumed run sees the same files."""
    odd = ["new\nline.png", os.fsdecode(b"caf\xe9.png"), "plain.png"]
    root = images(tmp_path / "data", odd)
    cache = tmp_path / "file_index.txt"
    first = list(index_folder(root, cache))
    again = list(index_folder(root, cache))  # read back from the cache
    assert sorted(first) == sorted(again) == sorted(odd)
    table = FileTable(odd, held_out_fraction=0.5)
    assert sorted(table) == sorted(odd) and all((root / p).is_file() for p in table)


@pytest.mark.parametrize("flags, message", [
    (["--max_train_samples", "0"], "argument --max_train_samples: 0 is not allowed: it must be at least 1"),
    (["--val_fraction", "1.0"], "argument --val_fraction: 1.0 is not allowed: it must be below 1"),
    (["--num_workers", "-1"], "argument --num_workers: -1 is not allowed: it must be at least 0"),
])
def test_numbers_out_of_range_are_refused(tmp_path, capsys, flags, message):
    refused(lambda: pretrain(TINY + SYNTH + ["--output_dir", str(tmp_path / "o")] + flags), message, capsys=capsys)


def test_a_folder_too_small_to_split_is_not_trained_on_its_held_out_images(tmp_path, capsys):
    root = images(tmp_path / "one", ["only.png"])
    refused(lambda: pretrain(TINY + ["--data_path", str(root), "--output_dir", str(tmp_path / "o")]),
            f"--data_path {root} has 1 sample, all held out for evaluation", "--eval_data_path", capsys=capsys)
    assert not (tmp_path / "o" / "checkpoint-0.pth").exists()


# ---- --config YAML goes through the flags' own checks -------------------------------------------
@pytest.mark.parametrize("values, message", [
    ({"batch_size": 2.5}, "batch_size: invalid int value: '2.5'"),
    ({"mask_strategy": 5}, "mask_strategy: invalid choice: '5'"),
    ({"num_workers": -1}, "num_workers: argument --num_workers: -1 is not allowed"),
    ({"no_pictures": "yes"}, "no_pictures is a switch: write true or false"),
    ({"opt_betas": [0.9]}, "opt_betas takes 2 values, not 1"),
    ({"epochs": None}, "epochs needs a value"),
    ({"data_path": ["a", "b"]}, "data_path takes one value"),
])
def test_yaml_values_are_checked_as_flags_are(tmp_path, values, message):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(values))
    text = refused(lambda: pretrain_config_from_argv(["--config", str(config)] + TINY + SYNTH), f"--config {config}: ")
    assert message.replace("argument --num_workers: ", "") in text


def test_valid_yaml_values_mean_what_the_flags_mean(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 3\nopt_betas: [0.9, 0.95]\nclip_grad: null\nno_pictures: true\nblr: 1e-4\n"
                      "mask_strategy: random\nmin_lr: 0\n")
    random_masks = [a for a in TINY if a not in ("--min_mask_patches_per_block", "4")]
    cfg = pretrain_config_from_argv(["--config", str(config)] + random_masks + SYNTH)
    assert (cfg.optim.epochs, cfg.optim.opt_betas, cfg.optim.clip_grad, cfg.run.no_pictures) == (3, (0.9, 0.95), None, True)
    assert (cfg.optim.blr, cfg.views.mask_strategy, cfg.optim.min_lr) == (1e-4, "random", 0.0)
    cfg = pretrain_config_from_argv(["--config", str(config), "--epochs", "5"] + random_masks + SYNTH)
    assert cfg.optim.epochs == 5  # a flag still wins


# ---- weight files --------------------------------------------------------------------------------
def test_a_pth_with_flipped_bytes_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"model": {"w": torch.arange(4096, dtype=torch.float32)}}, path)
    data = bytearray(path.read_bytes())
    where = data.find(torch.arange(4096, dtype=torch.float32)[100:104].numpy().tobytes())
    data[where] ^= 0x01  # one weight changes, the file still loads in torch
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["model"]["w"][100] != 100  # what torch alone would hand over
    refused(lambda: read_checkpoint(path), "w.pth is corrupted", "fails its CRC-32 check")


def test_a_safetensors_file_with_flipped_bytes_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(path, {"w": torch.arange(4096, dtype=torch.float32)})
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    refused(lambda: load_safetensors_file(path), "w.safetensors is corrupted", "digest")


def test_files_written_here_are_readable_by_the_team(tmp_path):
    old = os.umask(0o022)
    try:
        save_safetensors(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o644  # safetensors alone writes 0600


@pytest.mark.parametrize("content, message", [
    (json.dumps({"model": "not weights"}).encode(), "holds JSON text, not weights"),
    (b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}", "is a .safetensors file with another extension"),
])
def test_what_a_pth_that_is_not_one_holds_is_said(tmp_path, content, message):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    text = refused(lambda: read_checkpoint(path), message)
    assert "pickled code" not in text


def test_a_truncated_pth_says_so_in_a_whole_sentence(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"model": {"w": torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    text = refused(lambda: read_checkpoint(path), "cut.pth is truncated")
    assert text.endswith("use an earlier checkpoint")


def test_a_kmeans_grid_mismatch_does_not_advise_what_is_already_set(tmp_path):
    from models.visual_tokenizers import create_visual_tokenizer
    from models.visual_tokenizers.kmeans import KMeansTokenizer
    from training.visual_tokenizer_fitting import save_kmeans_tokenizer

    save_kmeans_tokenizer(KMeansTokenizer(torch.randn(8, 48), 4), tmp_path / "t.safetensors", 32)
    text = refused(lambda: create_visual_tokenizer("kmeans", tmp_path / "t.safetensors", 32, expected_grid=8),
                   "gives a 4x4 token grid", "fit a tokenizer for a 8x8 grid")
    assert "--second_image_size 32" not in text.split(";")[1]


def test_fitting_a_tokenizer_on_too_few_patches_is_one_sentence(tmp_path, capsys):
    from util.fit_visual_tokenizer import main as fit

    root = images(tmp_path / "data", ["a.png", "b.png", "c.png"], size=32)
    refused(lambda: fit(["--data_path", str(root), "--output", str(tmp_path / "t.safetensors"), "--image_size", "32",
                         "--patch_size", "16", "--vocab_size", "64", "--num_workers", "0"]),
            "fewer than the 64 visual tokens asked for", "lower --vocab_size to at most", capsys=capsys)


# ---- pairs and labelled texts --------------------------------------------------------------------
def test_pair_files_cannot_reach_outside_the_image_root_unless_allowed(tmp_path, capsys):
    root = images(tmp_path / "root", ["0.png", "1.png"])
    outside = images(tmp_path / "elsewhere", ["secret.png"])
    records = [{"caption": "ok", "filename": "0.png"}, {"caption": "ok", "filename": "1.png"},
               {"caption": "up", "filename": "../elsewhere/secret.png"},
               {"caption": "abs", "filename": str(outside / "secret.png")}]
    pairs_file = tmp_path / "pairs.json"
    pairs_file.write_text(json.dumps(records))
    kept = read_pairs(pairs_file, root)
    assert [p.name for p, _ in kept] == ["0.png", "1.png"]
    assert "skipped 2 pairs whose image lies outside" in capsys.readouterr().out
    assert len(read_pairs(pairs_file, root, allow_outside=True)) == 4
    pairs_file.write_text(json.dumps(records[2:]))
    refused(lambda: read_pairs(pairs_file, root), "no usable pairs left", "--allow_outside_data_path")


def test_labelled_texts_without_a_label_or_a_text_are_skipped_and_counted(tmp_path, capsys):
    csv_file = tmp_path / "texts.csv"
    csv_file.write_text("text,label\na good film,pos\na bad film,neg\nno label here\n,pos\n   ,neg\n")
    assert read_labelled_texts(csv_file) == [("a good film", "pos"), ("a bad film", "neg")]
    assert "skipped 3 of 5 rows without a text or a label" in capsys.readouterr().out
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text('{"text": "x", "label": 1}\n{"text": "y"}\n{broken\n{"text": "z", "label": null}\n')
    assert read_labelled_texts(jsonl) == [("x", "1")]


# ---- prediction and search -----------------------------------------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    """Opening the checkpoint means the checks came too late."""
    import util.predict as predict_module

    monkeypatch.setattr(predict_module, "open_servable", lambda *a: pytest.fail("checked after loading the model"))


@pytest.mark.parametrize("case, message", [
    ("folder", "is a folder; name a .json file"),
    ("under_a_file", "cannot be written"),
    ("existing", "already exists; pass --overwrite"),
    ("topk", "--topk 0: list at least 1 answer"),
    ("missing", "--input"),
])
def test_predict_checks_its_arguments_before_any_work(tmp_path, capsys, no_model, case, message):
    from util.predict import main as predict

    photos = images(tmp_path / "photos", ["a.png"])
    output = {"folder": tmp_path, "under_a_file": tmp_path / "p.json" / "new.json",
              "existing": tmp_path / "p.json"}.get(case, tmp_path / "new.json")
    (tmp_path / "p.json").write_text("{}")
    argv = ["--checkpoint", "x.pth", "--input", str(tmp_path / "nowhere" if case == "missing" else photos),
            "--output", str(output)] + (["--topk", "0"] if case == "topk" else [])
    text = refused(lambda: predict(argv), message, capsys=capsys)
    if case == "missing":
        assert "--data_path" not in text and "does not exist" in text


def test_a_clean_rerun_leaves_no_stale_error_list(tmp_path):
    from serving.result_files import errors_path, write_results

    output = tmp_path / "p.json"
    write_results(output, {"a": 1}, {"broken.png": "unreadable"})
    assert errors_path(output).is_file()
    write_results(output, {"a": 1, "b": 2}, {})
    assert not errors_path(output).exists() and json.loads(output.read_text()) == {"a": 1, "b": 2}


def test_the_search_cache_notices_an_image_replaced_in_place(tmp_path):
    from util.search import cached_image_embeddings

    class CountingEmbedder:
        calls = 0

        def images(self, files):
            CountingEmbedder.calls += 1
            return torch.stack([torch.tensor([float(f.stat().st_size)]) for f in files]), files, []

    folder = images(tmp_path / "photos", ["a.png", "b.png"])
    checkpoint = tmp_path / "ckpt.pth"
    checkpoint.write_bytes(b"x")
    first, _, _ = cached_image_embeddings(CountingEmbedder(), str(checkpoint), folder, tmp_path / "cache")
    cached_image_embeddings(CountingEmbedder(), str(checkpoint), folder, tmp_path / "cache")
    assert CountingEmbedder.calls == 1  # the second query reads the cache
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "a.png")  # the same name, another picture
    again, _, _ = cached_image_embeddings(CountingEmbedder(), str(checkpoint), folder, tmp_path / "cache")
    assert CountingEmbedder.calls == 2 and not torch.equal(first, again)
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 for p in (tmp_path / "cache").iterdir())


def test_recall_over_too_few_held_out_pairs_is_said_to_mean_nothing():
    from models.retrieval import recall_at_k, trivial_recall_note

    one = recall_at_k(torch.randn(1, 1), torch.tensor([0]))
    assert all(value == 1.0 for value in one.values())  # any model, however bad
    assert "R@1/5/10 count every candidate" in trivial_recall_note(1, 1)
    assert "R@10" in trivial_recall_note(8, 16) and trivial_recall_note(11, 55) is None


# ---- runs that would overwrite or continue silently ----------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One epoch of image MIM on the synthetic world (its own k-means tokenizer)."""
    out = tmp_path_factory.mktemp("tiny_run")
    pretrain(TINY + SYNTH + ["--epochs", "1", "--no_pictures", "--output_dir", str(out)])
    return out


def test_a_finished_stage_is_not_overwritten_even_without_its_checkpoints(tmp_path, tiny_run, capsys):
    out = tmp_path / "stage"
    out.mkdir()
    (out / "merged_model.safetensors").write_bytes(b"an earlier stage's handover")
    refused(lambda: pretrain(TINY + SYNTH + ["--epochs", "1", "--output_dir", str(out)]),
            "already holds merged_model.safetensors of a finished stage", capsys=capsys)
    assert (out / "merged_model.safetensors").read_bytes() == b"an earlier stage's handover"


def test_auto_resume_refuses_another_tokenizer_and_says_what_else_changed(tmp_path, tiny_run, capsys):
    from models.visual_tokenizers.kmeans import KMeansTokenizer
    from training.visual_tokenizer_fitting import save_kmeans_tokenizer

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    other = tmp_path / "other.safetensors"
    save_kmeans_tokenizer(KMeansTokenizer(torch.randn(16, 48), 4), other, 16)
    refused(lambda: pretrain(TINY + SYNTH + ["--epochs", "2", "--output_dir", str(out), "--auto_resume",
                                             "--d_vae_weight_path", str(other)]),
            "was trained with another visual tokenizer", f"--d_vae_weight_path {tiny_run / 'visual_tokenizer.safetensors'}",
            capsys=capsys)
    before = (out / "args.yaml").read_text()
    pretrain(TINY + SYNTH + ["--epochs", "2", "--output_dir", str(out), "--auto_resume", "--batch_size", "4"])
    said = capsys.readouterr().out
    assert "resuming with changed settings: batch_size 8 -> 4; epochs 1 -> 2" in said
    assert (out / "args-until-epoch-0.yaml").read_text() == before  # the settings of the earlier checkpoints
    assert yaml.safe_load((out / "args.yaml").read_text())["batch_size"] == 4


def test_eval_of_a_checkpoint_without_the_tasks_head_is_refused(tmp_path, tiny_run, capsys):
    from main_finetune import main as finetune
    from tests.helpers import colour_folders

    folders = colour_folders(tmp_path / "colours", 16, 8, render_size=32)
    refused(lambda: finetune(["--task", "image_classification", "--data_path", str(folders), "--eval", "--finetune",
                              str(tiny_run / "checkpoint-0.pth"), "--input_size", "32", "--num_workers", "0",
                              "--output_dir", str(tmp_path / "ft")]),
            "has no trained pooler_norm, classifier for --task image_classification", "would score untrained weights",
            capsys=capsys)
