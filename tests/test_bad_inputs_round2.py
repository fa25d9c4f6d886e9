"""Issue 35, the second round of bad inputs: each case as a user makes it, failing on the code
before the fix. Work that did not happen is never reported as done; a resume within an epoch is
exact or refused; user mistakes get one sentence, never a traceback."""
from __future__ import annotations

import io
import shutil
import tarfile

import pytest
import yaml
from PIL import Image

from main_pretrain_cook import main as pretrain
from tests.test_bad_inputs import refused
from tests.test_pretrain_cli import SYNTH, TINY, TINY_BASE


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (90, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    from util.train_text_tokenizer import main as train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "100", "--output", str(out)])


# ---- work that did not happen ---------------------------------------------------------------------
@pytest.mark.parametrize("members", [
    {".jpg": b"not an image", ".txt": b"a caption"},  # images that are not images
    {".jpg": None, ".txt": None},  # real images without a caption
])
def test_shards_that_yield_no_sample_train_nothing_and_save_nothing(tmp_path, capsys, text_tokenizer, members):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for i in range(8):
            _add(tar, f"{i:04d}.jpg", members[".jpg"] or _png())
            if members[".txt"]:
                _add(tar, f"{i:04d}.txt", members[".txt"])
    val = tmp_path / "val"
    shutil.copytree(shards, val)
    out = tmp_path / "run"
    text = refused(lambda: pretrain(TINY_BASE + ["--exp_name", "image_text_itc", "--webdataset", "--data_path", str(shards),
                                            "--train_num_samples", "8", "--eval_data_path", str(val), "--tokenizer",
                                            str(text_tokenizer), "--epochs", "1", "--output_dir", str(out)]),
                   "epoch 0 trained on nothing: all 8 samples", str(shards), capsys=capsys)
    assert "Traceback" not in text
    assert not list(out.glob("checkpoint-*")) and not (out / "stage_report.json").exists()


# ---- resuming within an epoch ------------------------------------------------------------------------
STEP_RUN = TINY + SYNTH + ["--epochs", "2", "--save_every_steps", "2"]  # 4 batches of 8 an epoch


@pytest.fixture(scope="module")
def step_checkpoint(tmp_path_factory):
    """checkpoint-0-step2.pth (epoch 0, after 2 of its 4 batches) of a two-epoch run, kept."""
    import training.pretrain
    import training.step_checkpoints

    out = tmp_path_factory.mktemp("steps")
    with pytest.MonkeyPatch.context() as patch:
        for module in (training.pretrain, training.step_checkpoints):
            patch.setattr(module, "prune_step_checkpoints", lambda *a: [])
        pretrain(STEP_RUN + ["--epochs", "1", "--no_pictures", "--output_dir", str(out)])
    return out / "checkpoint-0-step2.pth"


@pytest.mark.parametrize("change, said", [
    (["--batch_size", "4"], "--batch_size 8 -> 4"),
    (["--synthetic_train_size", "48"], "--synthetic_train_size 32 -> 48"),
    (["--max_train_samples", "16"], "--max_train_samples None -> 16"),
    (["--seed", "1"], "--seed 0 -> 1"),
])
def test_a_step_resume_that_could_not_continue_its_epoch_exactly_is_refused(tmp_path, capsys, step_checkpoint,
                                                                             change, said):
    out = tmp_path / "resumed"
    same_targets = ["--d_vae_weight_path", str(step_checkpoint.parent / "visual_tokenizer.safetensors")]
    text = refused(lambda: pretrain(STEP_RUN + change + same_targets + ["--output_dir", str(out), "--resume",
                                                                        str(step_checkpoint)]),
                   "stopped within epoch 0, after 2 of its batches", said, "samples trained twice or never",
                   "start the run again in a new --output_dir", capsys=capsys)
    assert "Traceback" not in text and not list(out.glob("checkpoint-*"))


def test_a_step_resume_into_an_epoch_now_too_short_is_refused(tmp_path, capsys, step_checkpoint):
    from training.step_checkpoints import check_mid_epoch_resume

    state = {"epoch": 3, "batches_done": 6, "world_size": 1}
    (tmp_path / "checkpoint-2.pth").write_bytes(b"")
    with pytest.raises(Exception, match="this run's epoch has only 4 batches, so nothing of it would be left") as info:
        check_mid_epoch_resume(str(tmp_path / "checkpoint-3-step6.pth"), state, {}, {}, 4)
    assert f"continue from the epoch checkpoint {tmp_path / 'checkpoint-2.pth'}" in str(info.value)


def test_a_step_resume_says_where_it_is_and_keeps_the_settings_it_changes(tmp_path, capsys, step_checkpoint):
    out = tmp_path / "resumed"
    shutil.copytree(step_checkpoint.parent, out)
    capsys.readouterr()
    pretrain(STEP_RUN + ["--output_dir", str(out), "--resume", str(out / step_checkpoint.name), "--no_pictures"])
    said = capsys.readouterr().out
    assert "(within epoch 0, after 2 of its batches)" in said and "epoch -1" not in said
    assert "the settings of epoch 0's first 2 batches are kept in" in said
    kept = out / "args-until-epoch-0-step2.yaml"
    assert yaml.safe_load(kept.read_text())["epochs"] == 1 and yaml.safe_load((out / "args.yaml").read_text())["epochs"] == 2
    assert not list(out.glob("args-until-epoch--*"))


# ---- experiments ---------------------------------------------------------------------------------
@pytest.mark.parametrize("knob, said", [
    (["--wise_alpha", "2"], "wise's text_mlm stage would be refused: argument --wise_alpha: 2 is not allowed"),
    (["--replay_ratio", "1.0"], "replay's text_mlm stage would be refused: argument --replay_ratio: 1 is not allowed"),
])
def test_the_continual_benchmark_checks_every_child_run_before_the_first(tmp_path, capsys, monkeypatch, knob, said):
    import experiments.continual_benchmark as benchmark

    def ran(*args):
        raise AssertionError("a child run started before the flags were checked")

    monkeypatch.setattr(benchmark, "run_script", ran)
    monkeypatch.setattr(benchmark, "write_reference", ran)
    monkeypatch.setattr(benchmark, "train_wordpiece", ran)
    refused(lambda: benchmark.main(["--quick", "--output_dir", str(tmp_path / "b"), *knob]), said, capsys=capsys)


def test_the_continual_benchmark_refuses_an_output_dir_that_is_a_file(tmp_path, capsys):
    from experiments.continual_benchmark import main as benchmark

    (tmp_path / "results").write_text("not a folder")
    refused(lambda: benchmark(["--quick", "--output_dir", str(tmp_path / "results")]),
            f"--output_dir {tmp_path / 'results'} is a file; give a folder", capsys=capsys)


def test_stopping_an_experiment_stops_its_child_run(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    experiment = subprocess.Popen([sys.executable, "-c", "from pathlib import Path; from experiments.experiment_runs import "
                                   f"run_script; run_script(['-c', {child!r}], Path({str(tmp_path / 'log.txt')!r}))"],
                                  cwd=ROOT)
    deadline = time.time() + 60
    while not (pid_file.is_file() and pid_file.read_text()):
        assert time.time() < deadline and experiment.poll() is None
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    experiment.send_signal(signal.SIGTERM)
    assert experiment.wait(timeout=60) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):  # reaped: gone, not a zombie left running
        os.kill(pid, 0)


# ---- outside files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"hello\n", b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s."])  # text; a legacy pickle
def test_a_vqkd_file_that_is_not_a_checkpoint_is_one_sentence(tmp_path, content):
    from common.errors import UserError
    from models.visual_tokenizers.vqkd import load_vqkd_tokenizer

    path = tmp_path / "vqkd.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"--d_vae_weight_path: .*vqkd.pth .*--d_vae_type vqkd takes BEiT v2's"):
        load_vqkd_tokenizer(path)


# ---- flags where nothing reads them ----------------------------------------------------------------
def _scoped_flags():
    import dataclasses

    from training.config import PRETRAIN_GROUPS

    return [(group, field) for group, (_, cls) in PRETRAIN_GROUPS.items() for field in dataclasses.fields(cls)
            if field.metadata.get("scope") is not None]


def _as_given(field) -> list[str]:
    """The flag on a command line, with a value it accepts."""
    import argparse

    kwargs = field.metadata["argparse"]
    if kwargs.get("action") is argparse.BooleanOptionalAction:
        return [f"--no-{field.name}"] if field.default else [f"--{field.name}"]
    if field.default is False:
        return [f"--{field.name}"]
    default = field.default
    if default is None or default == ():
        lowest = field.metadata["range"][0]
        number = str(int(lowest)) if lowest and lowest > 1 else "1"
        value = kwargs["choices"][0] if "choices" in kwargs else ("x.json" if "path" in field.name else number)
        return [f"--{field.name}", str(value)]
    values = default if isinstance(default, tuple) else (default,)
    return [f"--{field.name}", *map(str, values)]


BASES = {"image_mim": TINY + SYNTH, "text_mlm": TINY_BASE + SYNTH,
         "image_text_itc": TINY_BASE + SYNTH + ["--exp_name", "image_text_itc"]}


def test_every_scoped_flag_is_refused_where_nothing_reads_it(tmp_path):
    """Each flag that declares a scope, given where its scope does not hold, is refused naming the
    flag; the bases cover a method and mode that read it nowhere."""
    from common.errors import UserError
    from training.cli import pretrain_config_from_argv

    (tmp_path / "photos").mkdir()
    bases = {name: argv + ["--output_dir", str(tmp_path / name)] for name, argv in BASES.items()}
    bases["photos"] = TINY + ["--data_path", str(tmp_path / "photos"), "--output_dir", str(tmp_path / "p")]
    if "--exp_name" not in bases["text_mlm"]:
        bases["text_mlm"] += ["--exp_name", "text_mlm"]
    configs = {name: pretrain_config_from_argv(argv) for name, argv in bases.items()}
    untested = []
    for _, field in _scoped_flags():
        scope = field.metadata["scope"]
        outside = [name for name, cfg in configs.items() if not scope.applies(cfg)]
        if not outside:
            untested.append(field.name)
            continue
        with pytest.raises(UserError, match=f"--{field.name} is read only by .*: nothing in this run reads it"):
            pretrain_config_from_argv(bases[outside[0]] + _as_given(field))
    assert not untested, f"no base run lies outside the scope of {untested}"


# Flags every pretraining run reads, or that a check of their own covers (training/flag_checks.py,
# the weights' build): a new flag must declare its scope (flag(..., scope=...)) or be added here.
UNSCOPED = {
    "model", "init_from", "resume", "auto_resume", "image_size", "drop_path", "grad_checkpointing", "compile",
    "fsdp", "patch_size", "ffn", "layer_scale_init_value",  # a checkpoint's own value only (training/weights.py)
    "vlffn_start_layer_index", "sharded_checkpoint",  # flag_checks
    "data_path", "eval_data_path", "val_fraction", "bands", "max_train_samples", "max_val_samples",
    "max_bad_samples", "num_workers", "pin_mem", "no_pin_mem", "data_weights", "tokenizer", "webdataset",
    "train_data_upsampling_factors", "max_text_len_of_initckpt", "vocab_size", "lora_rank", "self_regularization",
    "cl_method", "fisher_samples",
    # the MIM targets of a MIM stage, and of the MIM probe in a later stage's report
    "d_vae_type", "d_vae_weight_path", "second_image_size", "second_interpolation",
    "batch_size", "accum_iter", "epochs", "blr", "lr", "min_lr", "warmup_epochs", "warmup_steps", "weight_decay",
    "opt_betas", "clip_grad", "adamw_impl", "seed", "device", "amp", "output_dir", "log_dir", "print_freq", "eval",
    "gpu_amp", "local_rank", "dist_url", "world_size", "preset", "save_per_epochs", "save_epochs_from_zero",
    "save_every_steps", "no_pictures", "start_epoch",
}


def test_every_pretraining_flag_declares_where_it_applies():
    import dataclasses

    from training.config import PRETRAIN_GROUPS

    unscoped = {f.name for _, (_, cls) in PRETRAIN_GROUPS.items() for f in dataclasses.fields(cls)
                if f.metadata.get("scope") is None}
    assert unscoped == UNSCOPED, (f"declare a scope for {sorted(unscoped - UNSCOPED)} (or list them here with why)",
                                  sorted(UNSCOPED - unscoped))


def test_a_flag_given_with_its_default_in_a_config_file_is_not_refused(tmp_path):
    from training.cli import pretrain_config_from_argv

    config = tmp_path / "args.yaml"  # a run's record holds every flag, most at their defaults
    config.write_text("wise_alpha: 0.5\nreplay_ratio: 0.25\nmlm_probability: 0.15\n")
    pretrain_config_from_argv(["--config", str(config)] + TINY + SYNTH + ["--output_dir", str(tmp_path / "o")])
    config.write_text("wise_alpha: 0.3\n")
    with pytest.raises(Exception, match=r"--wise_alpha \(in --config .*args.yaml\) is read only by --cl_method wise, "
                                        r"and this run's is full"):
        pretrain_config_from_argv(["--config", str(config)] + TINY + SYNTH + ["--output_dir", str(tmp_path / "o")])


def test_a_scratch_only_flag_that_differs_from_the_checkpoint_is_refused(tmp_path, capsys, step_checkpoint,
                                                                         text_tokenizer):
    refused(lambda: pretrain(TINY_BASE + SYNTH + ["--exp_name", "text_mlm", "--patch_size", "16", "--init_from",
                                                  str(step_checkpoint), "--tokenizer", str(text_tokenizer),
                                                  "--output_dir", str(tmp_path / "o")]),
            "--patch_size 16 shapes a model built from scratch", "has 8", capsys=capsys)


def test_a_stage_started_from_a_checkpoint_takes_its_image_size(tmp_path, step_checkpoint, text_tokenizer):
    """A text stage --init_from a 32 px stage was built at 224 px unless --image_size was repeated."""
    from training.cli import pretrain_config_from_argv
    from training.pretrain import build_run
    from training.scaffold import RunContext

    unsized = [a for i, a in enumerate(TINY_BASE) if "--image_size" not in TINY_BASE[max(i - 1, 0):i + 1]]
    cfg = pretrain_config_from_argv(unsized + SYNTH + ["--exp_name", "text_mlm", "--init_from", str(step_checkpoint),
                                                       "--tokenizer", str(text_tokenizer), "--output_dir",
                                                       str(tmp_path / "o")])
    assert cfg.model.image_size is None
    ctx = RunContext.start("cpu", cfg.run.output_dir, 0, exclusive=False)
    try:
        run = build_run(cfg, ctx)
    finally:
        ctx.finish()
    assert run.backbone.cfg.img_size == 32 and run.cfg.model.image_size == 32
    assert run.cfg.visual_tokenizer.second_image_size == 16


def test_compile_compiles_what_it_says_of_a_vqkd_tokenizer(capsys):
    import torch

    from models import create_model
    from models.visual_tokenizers.vqkd import VqkdTokenizer
    from models.visual_tokenizers.vqkd_vit import VitShape
    from training.compilation import compile_modules

    tokenizer = VqkdTokenizer(VitShape(32, 8, 3, 64, 2, 1), 16, 8)
    compile_modules(create_model("vlmo_tiny_patch16", img_size=32, patch_size=8).blocks, tokenizer)
    assert all(block._compiled_call_impl is not None for block in tokenizer.encoder.blocks)
    assert "and the visual tokenizer's encoder blocks compiled" in capsys.readouterr().out
    images = torch.rand(2, 3, 32, 32)
    eager = VqkdTokenizer(VitShape(32, 8, 3, 64, 2, 1), 16, 8)
    eager.load_state_dict(tokenizer.state_dict())
    assert torch.equal(tokenizer.get_codebook_indices(images), eager.get_codebook_indices(images))


def test_a_vqkd_pth_head_count_is_said_and_can_be_given(tmp_path, capsys):
    import torch

    from models.visual_tokenizers.vqkd import VqkdTokenizer, load_vqkd_tokenizer, save_vqkd_tokenizer
    from models.visual_tokenizers.vqkd_vit import VitShape

    narrow = VqkdTokenizer(VitShape(32, 8, 3, 128, 1, 4), 16, 8)  # 4 heads of 32: a .pth cannot say so
    torch.save({"model": narrow.state_dict()}, tmp_path / "vqkd.pth")
    images = torch.rand(2, 3, 32, 32)
    guessed = load_vqkd_tokenizer(tmp_path / "vqkd.pth")
    assert "does not record its encoder's attention heads; read as 2 heads of 64" in capsys.readouterr().out
    given = load_vqkd_tokenizer(tmp_path / "vqkd.pth", num_heads=4)
    assert given.encoder.shape.num_heads == 4
    assert torch.equal(given.get_codebook_indices(images), narrow.get_codebook_indices(images))
    assert not torch.equal(given.code_vectors(images), guessed.code_vectors(images))  # the guess was wrong
    save_vqkd_tokenizer(given, tmp_path / "vqkd.safetensors", {})
    capsys.readouterr()
    assert load_vqkd_tokenizer(tmp_path / "vqkd.safetensors").encoder.shape.num_heads == 4  # recorded from now on
    assert capsys.readouterr().out == ""


def test_step_checkpoints_that_would_never_be_written_are_refused(tmp_path, capsys):
    out = tmp_path / "o"
    refused(lambda: pretrain(TINY + SYNTH + ["--epochs", "3", "--save_every_steps", "8", "--output_dir", str(out)]),
            "--save_every_steps 8 lands on epoch ends only (an epoch is 4 optimizer steps)", "--save_per_epochs 2",
            capsys=capsys)
    from training.step_checkpoints import check_step_interval

    capsys.readouterr()
    check_step_interval(10, 4, 1)  # every 2.5 epochs: some land within epochs
    assert "a step checkpoint comes about once every 2.5 epochs" in capsys.readouterr().out


def test_util_train_vqkd_refuses_a_one_code_codebook(tmp_path, capsys):
    from util.train_vqkd import main as train_vqkd

    refused(lambda: train_vqkd(["--codebook_size", "1", "--teacher", "x.pth", "--output", str(tmp_path / "t.safetensors")]),
            "--codebook_size 1: a codebook of one code gives every patch the same token", capsys=capsys)


def test_shard_ranges_and_eval_shards_name_their_own_flag(tmp_path):
    from common.errors import UserError
    from custom_datasets.shard_sources import expand_shards

    for i in range(4):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    with pytest.raises(UserError, match=r"--data_path .*: the range \{00003..00000\} runs backwards; write it from the "
                                        r"first shard to the last, \{00000..00003\}"):
        expand_shards(str(tmp_path / "{00003..00000}.tar"))
    with pytest.raises(UserError, match="^--eval_data_path .*nothere matches no .tar shards"):
        expand_shards(str(tmp_path / "nothere"), "--eval_data_path")


def test_caption_labels_names_its_own_flag(tmp_path, capsys):
    from util.caption_labels import main as caption_labels

    captions = tmp_path / "captions.json"
    captions.write_text('[{"caption": "a dog"}]')
    refused(lambda: caption_labels(["--captions", str(captions), "--class", "dog=dog", "--class", "cat=cat",
                                    "--output", str(tmp_path / "out")]),
            f"--captions {captions}: none of its 1 pairs is usable", capsys=capsys)


def test_an_epoch_far_from_what_the_shards_hold_is_said(tmp_path, capsys):
    from custom_datasets.webdataset_pairs import note_epoch_length

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for i in range(40):
            _add(tar, f"{i:04d}.jpg", _png())
            _add(tar, f"{i:04d}.txt", b"a caption")
    note_epoch_length(100000, [shards / "00000.tar"])
    assert "the training shards hold 40 samples, so an epoch reads each about 2500 times" in capsys.readouterr().out
    note_epoch_length(50, [shards / "00000.tar"])
    assert capsys.readouterr().out == ""  # close to what they hold: nothing to say


def test_a_vqkd_stage_takes_beit_v2s_tokenizer_view_unless_told(tmp_path):
    from training.cli import pretrain_config_from_argv
    from training.pretrain import settle_image_sizes

    base = TINY_BASE + SYNTH + ["--output_dir", str(tmp_path / "o")]
    vqkd = pretrain_config_from_argv(base + ["--d_vae_type", "vqkd", "--d_vae_weight_path", "v.safetensors"])
    assert vqkd.views.second_interpolation == "bicubic"  # BEiT v2's recipe (the default was lanczos)
    assert settle_image_sizes(vqkd, 224).visual_tokenizer.second_image_size == 224  # its 16 px patches: the same grid
    kmeans = pretrain_config_from_argv(base)
    assert kmeans.views.second_interpolation == "lanczos" and settle_image_sizes(kmeans, 224).visual_tokenizer \
        .second_image_size == 112
    told = pretrain_config_from_argv(base + ["--d_vae_type", "vqkd", "--d_vae_weight_path", "v.safetensors",
                                             "--second_interpolation", "lanczos"])
    assert told.views.second_interpolation == "lanczos"


def test_the_other_experiments_check_every_child_run_before_the_first(tmp_path, capsys, monkeypatch):
    """The targets experiment, the pretraining screen and the transfer experiment refuse a bad child
    flag before any child runs."""
    import experiments.pretraining_screen as screen
    import experiments.targets_experiment as targets

    def ran(*args, **kwargs):
        raise AssertionError("a child ran before the flags were checked")

    monkeypatch.setattr(targets, "run", ran)
    monkeypatch.setattr(screen, "run_script", ran)
    teacher = tmp_path / "teacher.pth"
    teacher.write_bytes(b"")
    monkeypatch.setattr(targets, "AGGREGATION_FLAGS", ["--early_layers", "0"])
    refused(lambda: targets.main(["--teacher", str(teacher), "--targets", "kmeans", "kmeans+agg", "--output_dir",
                                  str(tmp_path / "t")]),
            "the kmeans+agg MIM stage would be refused: argument --early_layers: 0 is not allowed", capsys=capsys)
    labelled = tmp_path / "labelled"
    (labelled / "train" / "a").mkdir(parents=True)
    refused(lambda: screen.main(["--data_path", str(labelled), "--labelled", str(labelled), "--recipe", "base=",
                                 "--recipe", "odd=--wise_alpha 0.3", "--output_dir", str(tmp_path / "s")]),
            "--recipe 'odd' would be refused: --wise_alpha is read only by --cl_method wise", capsys=capsys)


def test_the_transfer_experiment_checks_its_probe_flags_before_fine_tuning(tmp_path, capsys, monkeypatch,
                                                                            step_checkpoint):
    import experiments.transfer_experiment as transfer
    from tests.helpers import colour_folders

    monkeypatch.setattr(transfer, "finetune", lambda cfg: (_ for _ in ()).throw(AssertionError("it ran")))
    folders = colour_folders(tmp_path / "colours", 16, 8, render_size=32)
    refused(lambda: transfer.main(["--pretrained", str(step_checkpoint), "--data_path", str(folders), "--output_dir",
                                   str(tmp_path / "x"), "--probe_flags", "--layer_decay 2"]),
            "the pretrained probe runs would be refused: --layer_decay must be in (0, 1]", capsys=capsys)
