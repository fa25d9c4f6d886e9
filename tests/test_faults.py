"""Fault injection: concurrent runs, kill -9 (also in the middle of writing a checkpoint), a run
diverging on the last step of an epoch, NaN pixels, unwritable and full disks, crafted pickles and
malformed files. Each test checks the exit code, the one sentence, and that no checkpoint or log
line was lost, mixed or corrupted."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from common.checkpoint_io import read_checkpoint
from main_pretrain_cook import main
from tests.helpers import ROOT
from tests.test_pretrain_cli import SYNTH, TINY, TINY_BASE

RUN3 = TINY + SYNTH + ["--epochs", "3", "--save_per_epochs", "1", "--synthetic_train_size", "64"]


def _log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def _spawn(argv, out, slow_write_at: int | None = None) -> subprocess.Popen:
    """The CLI in its own process; `slow_write_at`: the checkpoint of that epoch is written halfway,
    then the writer stalls (so a kill lands mid-write)."""
    stall = "" if slow_write_at is None else textwrap.dedent(f"""
        import time, torch, common.checkpoint_io as io
        real = torch.save
        def stalling(obj, f, *a, **k):
            real(obj, f, *a, **k)
            if isinstance(obj, dict) and obj.get("epoch") == {slow_write_at} and "optimizer" in obj:
                size = os.path.getsize(f)
                with open(f, "r+b") as handle:
                    handle.truncate(size // 2)
                open({str(out / "stalled")!r}, "w").close()
                time.sleep(60)
        io.torch.save = stalling
    """)
    code = f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\n{stall}\nfrom main_pretrain_cook import main\nmain({argv!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ))  # the same threads as this process: bit-exact comparisons


def _wait_for(path, proc, timeout=120):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - start < timeout
        time.sleep(0.05)


def _same_weights(a, b):
    ca, cb = read_checkpoint(a), read_checkpoint(b)
    assert ca.model.keys() == cb.model.keys()
    for key in ca.model:
        assert torch.equal(ca.model[key], cb.model[key]), key


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    main(RUN3 + ["--output_dir", str(out)])
    return out


def test_a_second_run_on_a_busy_output_folder_stops(tmp_path, capsys):
    out = tmp_path / "busy"
    first = _spawn(RUN3 + ["--output_dir", str(out)], out, slow_write_at=0)
    _wait_for(out / "stalled", first)
    for extra in ([], ["--auto_resume"]):
        with pytest.raises(SystemExit) as info:
            main(RUN3 + ["--output_dir", str(out)] + extra)
        assert info.value.code == 2 and "is in use by another run (pid" in capsys.readouterr().err
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (out / "checkpoint-0.pth").exists()  # the stalled write never reached its final name


def test_kill_9_at_random_points_and_mid_write_then_auto_resume_is_bit_exact(tmp_path, straight, capsys):
    out = tmp_path / "killed"
    rng = np.random.default_rng(0)
    victim = _spawn(RUN3 + ["--output_dir", str(out)], out, slow_write_at=1)  # dies while writing epoch 1
    _wait_for(out / "stalled", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # the half-written file is left behind
    for delay in rng.uniform(0.5, 4.0, size=2):  # then killed at random moments of the resumed runs
        victim = _spawn(RUN3 + ["--output_dir", str(out), "--auto_resume"], out)
        time.sleep(delay)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    main(RUN3 + ["--output_dir", str(out), "--auto_resume"])
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    _same_weights(straight / "checkpoint-2.pth", out / "checkpoint-2.pth")
    assert _log(out) == _log(straight)  # every epoch once, the same numbers
    assert oct((out / "checkpoint-2.pth").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_restart_before_the_first_checkpoint_is_reproducible(tmp_path, straight):
    out = tmp_path / "again"
    out.mkdir()
    shutil.copy(straight / "visual_tokenizer.safetensors", out)  # the fit happened, the training did not
    main(RUN3 + ["--epochs", "1", "--output_dir", str(out)])
    fresh = tmp_path / "fresh"
    main(RUN3 + ["--epochs", "1", "--output_dir", str(fresh)])
    _same_weights(fresh / "checkpoint-0.pth", out / "checkpoint-0.pth")


def test_resume_with_sparse_checkpoints_keeps_each_log_line_once(tmp_path):
    every2 = TINY + SYNTH + ["--epochs", "4", "--save_per_epochs", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    main(every2 + ["--output_dir", str(full)])
    cut.mkdir()
    for name in ("checkpoint-1.pth", "visual_tokenizer.safetensors"):
        shutil.copy(full / name, cut)
    (cut / "log.txt").write_text("".join((full / "log.txt").read_text().splitlines(keepends=True)[:3]))  # epoch 2 ran
    main(every2 + ["--output_dir", str(cut), "--auto_resume"])
    assert [r["epoch"] for r in _log(cut)] == [0, 1, 2, 3] and _log(cut) == _log(full)


def test_divergence_on_the_last_step_of_an_epoch_saves_nothing_of_it(tmp_path, monkeypatch, capsys):
    import training.step as step_module

    real = step_module.optimizer_step
    calls = {"n": 0}

    def diverging(model, optimizer, scaler, settings, step=0, watch=None):
        applied = real(model, optimizer, scaler, settings, step, watch)
        calls["n"] += 1
        if calls["n"] == 2 * 8:  # the last optimizer step of epoch 1 (8 steps per epoch)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1e30)
        return applied

    monkeypatch.setattr(step_module, "optimizer_step", diverging)
    out = tmp_path / "diverged"
    with pytest.raises(SystemExit) as info:
        main(RUN3 + ["--output_dir", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "after epoch 1" in err and "this epoch was not saved" in err
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-0.pth"]
    assert all(torch.isfinite(v).all() for v in read_checkpoint(out / "checkpoint-0.pth").model.values())
    assert [r["epoch"] for r in _log(out)] == [0]


def test_a_nan_pixel_is_counted_and_does_not_spread(tmp_path, capsys):
    folder = tmp_path / "tiles"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        tile = rng.uniform(100, 4000, size=(32, 32, 4)).astype(np.float32)
        if i == 3:
            tile[5, 7, 1] = np.nan
        np.save(folder / f"{i:02d}.npy", tile)
    main(TINY + ["--data_path", str(folder), "--epochs", "1", "--output_dir", str(tmp_path / "out")])
    assert "1 non-finite pixels (NaN/inf) in 1 of the tiles" in capsys.readouterr().out
    from custom_datasets.image_folder import ImageFiles

    data = ImageFiles(folder, lambda im, key=None: {"array": np.asarray(im)})
    assert np.isfinite(data.scaler.low).all() and np.isfinite(data.scaler.high).all()
    means = np.stack([data[i]["array"].reshape(-1, 3).mean(0) for i in range(len(data))])
    assert (means > 20).all()  # every band of every tile keeps its values


@pytest.mark.parametrize("make, message", [
    (lambda t: ["--output_dir", str(t / "a_file" / "out")], "cannot be written"),
    (lambda t: ["--lr", "1e39"], "is not a learning rate that trains"),
    (lambda t: ["--blr", "nan"], "--blr nan is not a learning rate"),
])
def test_bad_settings_are_one_sentence(tmp_path, capsys, make, message):
    (tmp_path / "a_file").write_text("not a folder")
    argv = TINY + SYNTH + ["--epochs", "1", "--output_dir", str(tmp_path / "o")] + make(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_full_disk_is_one_sentence_and_the_last_checkpoint_survives(tmp_path, monkeypatch, capsys):
    import errno

    import common.checkpoint_io as io

    out = tmp_path / "full"
    real = io.torch.save

    def full_disk(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("epoch") == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(io.torch, "save", full_disk)
    with pytest.raises(SystemExit) as info:
        main(RUN3 + ["--output_dir", str(out)])
    assert info.value.code == 2 and "the disk is full while writing" in capsys.readouterr().err
    assert read_checkpoint(out / "checkpoint-0.pth").extra["epoch"] == 0
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_pairs_whose_images_are_all_missing_stop_before_training(tmp_path, capsys, word_pieces):
    records = [{"caption": "a red circle", "filename": f"missing/{i}.png"} for i in range(10)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(SystemExit) as info:
        main(TINY_BASE + ["--exp_name", "image_text_itc", "--tokenizer", word_pieces, "--data_file_path",
                     str(tmp_path / "pairs.jsonl"), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "images of the image-text pairs could be read" in err and "missing/" in err
    assert not (tmp_path / "o" / "checkpoint-0.pth").exists()


def test_malformed_and_non_utf8_pair_lines_are_skipped_and_counted(tmp_path, capsys, word_pieces):
    for i in range(12):
        Image.new("RGB", (32, 32), (20 * i, 50, 90)).save(tmp_path / f"{i}.png")
    lines = [json.dumps({"caption": f"picture {i}", "filename": f"{i}.png"}).encode() for i in range(12)]
    lines += [b"{not json", b'{"caption": "\xff\xfe bad bytes", "filename": "0.png"}', b'{"caption": "", "filename": "1.png"}']
    (tmp_path / "pairs.jsonl").write_bytes(b"\n".join(lines))
    main(TINY_BASE + ["--exp_name", "image_text_itc", "--tokenizer", word_pieces, "--data_file_path",
                 str(tmp_path / "pairs.jsonl"), "--epochs", "1", "--output_dir", str(tmp_path / "o")])
    assert "skipped 3 of 15 pairs" in capsys.readouterr().out


@pytest.fixture(scope="module")
def word_pieces(tmp_path_factory):
    from custom_datasets.pair_data import caption_texts
    from models.text_tokenizer import train_wordpiece

    folder = tmp_path_factory.mktemp("tok") / "tok"
    train_wordpiece(caption_texts(["synthetic"], 500, 0), 200, folder)
    return str(folder)


def test_a_crafted_encoder_pickle_allocates_nothing(tmp_path):
    """A legacy-format pickle claiming a 1e12-element storage is refused before any allocation."""
    import pickle

    from common.errors import UserError
    from models.visual_tokenizers import create_visual_tokenizer

    folder = tmp_path / "dall_e"
    folder.mkdir()
    with open(folder / "encoder.pkl", "wb") as f:
        for value in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(value, f, protocol=2)

        pickler = pickle.Pickler(f, protocol=2)  # a persistent id naming a storage of 10^12 floats (4 TB)
        pickler.persistent_id = lambda obj: ("storage", torch.FloatStorage, "0", "cpu", 10**12) if obj == "s" else None
        pickler.dump({"blocks": "s"})
        pickle.dump(["0"], f, protocol=2)
        f.write((10**12).to_bytes(8, "little", signed=True))
    with pytest.raises(UserError, match="not a readable DALL-E encoder.pkl"):
        create_visual_tokenizer("dall-e", folder, 32)


def test_exif_orientation_and_tiny_tiles(tmp_path):
    from custom_datasets.image_io import open_rgb, read_tile

    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "photo.jpg", exif=exif)
    assert open_rgb(tmp_path / "photo.jpg").size == (20, 40)
    np.save(tmp_path / "pixel.npy", np.arange(3, dtype=np.uint8).reshape(1, 1, 3))
    assert read_tile(tmp_path / "pixel.npy", None).tolist() == [[[0, 1, 2]]]  # one pixel, three bands


def test_a_crash_below_python_names_where_each_thread_was(tmp_path):
    """A segfault in a native library (torch, gloo) would leave only the launcher's "Signal 11":
    an entry point prints the Python stack of the crash instead."""
    script = textwrap.dedent("""
        import ctypes
        from common.errors import cli_entry

        def read_a_freed_tensor():
            ctypes.string_at(0)  # a read of address 0: SIGSEGV in C, as a native library's bug would

        @cli_entry
        def main():
            read_a_freed_tensor()

        main()
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}  # the entry's doing, not the shell's
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in result.stderr
    assert "read_a_freed_tensor" in result.stderr and "main" in result.stderr
