"""--save_every_steps: checkpoints within an epoch, and an exact resume from them. A run killed with
SIGKILL at random steps and resumed with --auto_resume ends with the straight run's weights (bit for
bit) and its log; the same with gradient accumulation and on two processes; step checkpoints are
pruned; what cannot be exact is refused in one sentence."""
from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
import torch

from common.checkpoint_io import read_checkpoint
from main_pretrain_cook import main
from tests.distributed_harness import run_in_processes
from tests.test_faults import _spawn
from tests.test_pretrain_cli import SYNTH, TINY
from training.run_checkpoint import latest_checkpoint, prune_step_checkpoints, step_checkpoint_name

# 8 batches of 8 per epoch; drop_path makes the model draw from the generators too
RUN = TINY + SYNTH + ["--synthetic_train_size", "64", "--epochs", "2", "--drop_path", "0.1", "--save_every_steps", "3"]


def _same_weights(a, b):
    ca, cb = read_checkpoint(a), read_checkpoint(b)
    assert ca.model.keys() == cb.model.keys()
    for key in ca.model:
        assert torch.equal(ca.model[key], cb.model[key]), key


def _log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def _kill_after(argv, out, checkpoint: str, delay: float) -> None:
    """Runs the CLI until `checkpoint` appears, waits `delay` seconds, then kills it with SIGKILL."""
    victim = _spawn(argv, out)
    start = time.time()
    while not (out / checkpoint).exists() and victim.poll() is None:
        assert time.time() - start < 180
        time.sleep(0.02)
    time.sleep(delay)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    time.sleep(1.0)  # the loader's workers notice their parent is gone and let go of the folder


def test_kill_9_mid_epoch_with_loader_workers_then_auto_resume_is_bit_exact(tmp_path, capsys):
    argv = RUN + ["--num_workers", "2", "--save_per_epochs", "5"]
    main(argv + ["--output_dir", str(tmp_path / "straight")])
    straight = tmp_path / "straight"
    out = tmp_path / "killed"
    rng = np.random.default_rng()
    # the last resume always lands in a later epoch: persistent workers would have carried their state there
    first, second = rng.choice(["0-step3", "0-step6"]), rng.choice(["1-step1", "1-step4"])
    _kill_after(argv + ["--output_dir", str(out)], out, f"checkpoint-{first}.pth", rng.uniform(0, 0.5))
    _kill_after(argv + ["--output_dir", str(out), "--auto_resume"], out, f"checkpoint-{second}.pth", 0.0)
    capsys.readouterr()
    main(argv + ["--output_dir", str(out), "--auto_resume"])
    assert "continuing epoch" in capsys.readouterr().out  # it did resume within an epoch
    _same_weights(straight / "checkpoint-1.pth", out / "checkpoint-1.pth")
    assert _log(out) == _log(straight)  # the epochs' averages too, each epoch once


def _keep_every_checkpoint(patch=setattr) -> None:
    """The final epoch checkpoint supersedes (removes) the step checkpoints; tests resume from them."""
    import training.pretrain
    import training.step_checkpoints

    for module in (training.pretrain, training.step_checkpoints):
        patch(module, "prune_step_checkpoints", lambda *a: [])


def _resumed_equals_straight(argv, tmp_path, monkeypatch, step_checkpoint: str):
    """A straight run that keeps its step checkpoints, then a run resumed from `step_checkpoint` of
    it: both end with the same weights, and the resumed log is the straight one from that epoch on."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with monkeypatch.context() as patch:
        _keep_every_checkpoint(patch.setattr)
        main(argv + ["--output_dir", str(straight)])
    resumed.mkdir()
    main(argv + ["--output_dir", str(resumed), "--resume", str(straight / step_checkpoint)])
    _same_weights(straight / "checkpoint-1.pth", resumed / "checkpoint-1.pth")
    epoch = int(step_checkpoint.split("-")[1])
    assert _log(resumed) == _log(straight)[epoch:]
    return straight


@pytest.mark.slow
def test_gradient_accumulation_checkpoints_only_whole_optimizer_steps(tmp_path, monkeypatch):
    argv = RUN + ["--accum_iter", "2", "--save_every_steps", "1", "--save_per_epochs", "5"]
    straight = _resumed_equals_straight(argv, tmp_path, monkeypatch, "checkpoint-0-step4.pth")
    names = sorted(p.name for p in straight.glob("checkpoint-*-step*.pth"))
    assert names == [f"checkpoint-{e}-step{b}.pth" for e in (0, 1) for b in (2, 4, 6)]  # not the last batch


def _two_process_run(rank, world, argv, keep_every_checkpoint):
    if keep_every_checkpoint:
        _keep_every_checkpoint()
    main(argv)


@pytest.mark.slow
def test_two_processes_resume_mid_epoch_exactly_and_one_process_is_refused(tmp_path, capsys):
    argv = RUN + ["--save_per_epochs", "5", "--synthetic_train_size", "128"]
    straight = tmp_path / "straight"
    run_in_processes(_two_process_run, 2, argv + ["--output_dir", str(straight)], True)
    step = straight / "checkpoint-1-step1.pth"
    assert len(read_checkpoint(step).extra["mid_epoch"]["ranks"]) == 2  # every rank's generators
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    run_in_processes(_two_process_run, 2, argv + ["--output_dir", str(resumed), "--resume", str(step)], False)
    _same_weights(straight / "checkpoint-1.pth", resumed / "checkpoint-1.pth")
    assert _log(resumed) == _log(straight)[1:]
    with pytest.raises(SystemExit):
        main(argv + ["--output_dir", str(tmp_path / "one"), "--resume", str(step)])
    err = capsys.readouterr().err
    assert "stopped within epoch 1, after 1 of its batches, written by 2 processes, and this run has 1" in err and "Traceback" not in err


def test_an_epoch_checkpoint_of_another_world_size_continues_and_says_what_changes(tmp_path, capsys):
    from training.step_checkpoints import note_world_change

    note_world_change("ck.pth", 4, 1, None)
    said = capsys.readouterr().out
    assert "written by 4 processes and this run has 1" in said and "data order differ" in said
    note_world_change("ck.pth", 1, 1, None)
    note_world_change("ck.pth", None, 2, None)  # older checkpoints did not record it
    assert capsys.readouterr().out == ""


def test_latest_checkpoint_orders_step_checkpoints_within_their_epoch(tmp_path):
    for name in ("checkpoint-1.pth", "checkpoint-2-step3.pth", "checkpoint-2-step12.pth", "checkpoint-0-step40.pth"):
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "checkpoint-2-step12.pth"  # 12 > 3 as numbers, not as text
    (tmp_path / "checkpoint-2.pth").write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "checkpoint-2.pth"  # the epoch's end comes after its steps
    assert step_checkpoint_name(3, 7) == "3-step7"


def test_prune_keeps_the_newest_step_checkpoints_after_the_last_epoch_checkpoint(tmp_path):
    names = ["checkpoint-0-step2.pth", "checkpoint-0.pth", "checkpoint-1-step2.pth", "checkpoint-1-step4.pth",
             "checkpoint-1-step10.pth", "checkpoint-2-step1.pth"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "checkpoint-1-step6.pth").mkdir()  # a sharded one is a folder
    removed = prune_step_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-0-step2.pth", "checkpoint-1-step2.pth",
                                               "checkpoint-1-step4.pth", "checkpoint-1-step6.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0.pth", "checkpoint-1-step10.pth",
                                                          "checkpoint-2-step1.pth"]
    (tmp_path / "checkpoint-2.pth").write_bytes(b"")
    prune_step_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0.pth", "checkpoint-2.pth"]


def test_replay_with_step_checkpoints_is_refused_in_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(RUN + ["--cl_method", "replay", "--output_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert "--save_every_steps cannot be combined with --cl_method replay" in err and "Traceback" not in err


def test_optimizer_steps_count_whole_accumulated_steps():
    from training.step_checkpoints import StepCheckpointer

    counter = StepCheckpointer.__new__(StepCheckpointer)
    counter.batches, counter.accum = 7, 2  # 4 optimizer steps per epoch, the last of one batch
    assert [counter.optimizer_steps(0, b) for b in (2, 4, 6)] == [1, 2, 3]
    assert counter.optimizer_steps(1, 2) == 4 + 1


@pytest.mark.slow  # 21 s; the default kill test covers the mechanism
def test_resampled_shards_resume_mid_epoch_to_the_same_weights(tmp_path, monkeypatch):
    """A --webdataset stream (resampled, through a shuffle buffer, two workers) resumed from a step
    checkpoint reads the same samples as the run that never stopped."""
    from tests.test_webdataset import make_shards
    from util.train_text_tokenizer import main as train_tokenizer

    tok = train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "100", "--output", str(tmp_path / "tok")])
    argv = TINY + ["--exp_name", "image_text_itc", "--webdataset", "--data_path", str(make_shards(tmp_path / "wds")),
                   "--train_num_samples", "32", "--dataset_resampled", "--shuffle_buffer", "4", "--eval_data_path",
                   str(make_shards(tmp_path / "val", n_shards=1, bad=0)), "--tokenizer", str(tok), "--epochs", "2",
                   "--save_every_steps", "1", "--save_per_epochs", "5", "--num_workers", "2"]
    _resumed_equals_straight(argv, tmp_path, monkeypatch, "checkpoint-1-step2.pth")


@pytest.mark.slow  # the kill test covers the same path on the synthetic world's images
def test_an_image_folder_resumes_mid_epoch_to_the_same_weights(tmp_path, monkeypatch):
    """The same as the synthetic world's kill test, on PNG files in folders (the file reader, its
    index and held-out split), resumed from a step checkpoint with two loader workers."""
    from tests.helpers import colour_folders

    folder = colour_folders(tmp_path / "images", 48, 8, 32)
    argv = TINY + ["--data_path", str(folder / "train"), "--val_fraction", "0.25", "--epochs", "2",
                   "--save_every_steps", "2", "--save_per_epochs", "5", "--num_workers", "2", "--drop_path", "0.1"]
    _resumed_equals_straight(argv, tmp_path, monkeypatch, "checkpoint-1-step2.pth")
