"""End-to-end runs of main_pretrain_cook.py on tiny configs: synthetic and real data, resume,
bad samples, and flag errors."""
from __future__ import annotations

import json

import pytest
import torch

from common.checkpoint_io import read_checkpoint
from main_pretrain_cook import main
from tests.helpers import SHARED_DATA, requires_shared

# a tiny model for every mode, and what the modes that predict visual tokens (image_mim, compound_pretrain) add
TINY_BASE = ["--model", "vlmo_tiny_patch16", "--image_size", "32", "--patch_size", "8", "--batch_size", "8",
             "--num_workers", "0", "--print_freq", "100", "--drop_path", "0", "--warmup_epochs", "0.5"]
TINY_TOKENS = ["--second_image_size", "16", "--visual_vocab_size", "16", "--tokenizer_fit_images", "64",
               "--min_mask_patches_per_block", "4"]
TINY = TINY_BASE + TINY_TOKENS


def tiny_for(mode: str) -> list[str]:
    """TINY less the flags `mode` does not read (refused there)."""
    from models.modes import PRETRAIN_MODES

    return TINY if "visual_tokens" in PRETRAIN_MODES[mode].reads else TINY_BASE
SYNTH = ["--data_path", "synthetic", "--synthetic_train_size", "32", "--synthetic_val_size", "16", "--synthetic_render_size", "32"]


def _log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_interrupted_run_resumes_bit_exactly(tmp_path):
    """A run stopped after epoch 0 and resumed ends with exactly the weights of a straight run."""
    import shutil

    straight, split = tmp_path / "straight", tmp_path / "split"
    common = TINY + SYNTH + ["--epochs", "2", "--save_per_epochs", "1"]
    main(common + ["--output_dir", str(straight)])
    split.mkdir()
    for name in ("checkpoint-0.pth", "visual_tokenizer.safetensors"):  # the state an interruption leaves
        shutil.copy(straight / name, split / name)
    (split / "log.txt").write_text((straight / "log.txt").read_text().splitlines(keepends=True)[0])
    main(common + ["--output_dir", str(split), "--auto_resume"])
    a = read_checkpoint(straight / "checkpoint-1.pth")
    b = read_checkpoint(split / "checkpoint-1.pth")
    assert a.extra["epoch"] == b.extra["epoch"] == 1 and a.extra["step"] == b.extra["step"]
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
    assert _log(split)[1] == _log(straight)[1]
    assert [r["epoch"] for r in _log(split)] == [0, 1]
    assert {"train_loss", "train_acc_mim", "test_acc_mim", "test_loss_mim", "train_lr"} <= set(_log(split)[0])
    assert (straight / "args.yaml").is_file() and (straight / "visual_tokenizer.safetensors").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in straight.iterdir())
    torch.load(straight / "checkpoint-1.pth", weights_only=True)  # plain tensors and types only
    # a finished run's directory is never overwritten by a new run
    with pytest.raises(SystemExit):
        main(TINY + SYNTH + ["--epochs", "1", "--output_dir", str(straight)])
    # --eval on the finished checkpoint reproduces the last held-out accuracy
    stats = main(TINY + SYNTH + ["--eval", "--resume", str(straight / "checkpoint-1.pth"), "--output_dir", str(straight)])
    assert stats["acc_mim"] == pytest.approx(_log(straight)[-1]["test_acc_mim"], abs=1e-6)


def test_init_from_a_run_checkpoint_starts_a_new_stage(tmp_path, capsys):
    first = tmp_path / "first"
    random_masks = [a for a in TINY if a not in ("--min_mask_patches_per_block", "4")] + ["--mask_strategy", "random"]
    main(random_masks + SYNTH + ["--epochs", "1", "--output_dir", str(first)])
    main(TINY + SYNTH + ["--epochs", "1", "--output_dir", str(tmp_path / "second"), "--init_from",
                         str(first / "checkpoint-0.pth"), "--d_vae_weight_path", str(first / "visual_tokenizer.safetensors")])
    assert "loaded the mim_head" in capsys.readouterr().out
    assert _log(tmp_path / "second")[0]["epoch"] == 0


def test_bad_samples_are_skipped_counted_and_bounded(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(20):
        Image.new("RGB", (40, 40), (i * 10, 100, 200 - i * 5)).save(data / f"{i:02d}.png")
    for i in range(3):
        (data / f"bad{i}.jpg").write_bytes(b"\xff\xd8 broken")
    common = TINY + ["--data_path", str(data), "--val_fraction", "0.2", "--epochs", "1"]
    main(common + ["--output_dir", str(tmp_path / "ok")])
    log = _log(tmp_path / "ok")[0]
    assert log["train_skipped_samples"] >= 1
    with pytest.raises(SystemExit):
        main(common + ["--output_dir", str(tmp_path / "strict"), "--max_bad_samples", "0"])
    assert "more than --max_bad_samples 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--d_vae_type", "dall-e"], "--d_vae_type dall-e needs --d_vae_weight_path"),
    (["--resume", "a.pth", "--init_from", "b.pth"], "--resume and --init_from both given"),
    (["--data_path", "/does/not/exist"], "--data_path /does/not/exist does not exist"),
    (["--num_mask_patches", "500"], "--num_mask_patches 500 exceeds the 16 patches"),
    (["--init_from", "missing.safetensors"], "missing.safetensors does not exist"),
])
def test_flag_errors_are_one_sentence(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(TINY + (SYNTH if "--data_path" not in argv else []) + ["--output_dir", str(tmp_path / "o")] + argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@requires_shared
@pytest.mark.parametrize("folder, extra", [("hymenoptera/train", []), ("landsat_tiles/rgbn_uint8_chw", ["--bands", "3,1,0"]),
                                           ("landsat_tiles/rgb_uint16_hwc", [])])
def test_real_folders(tmp_path, folder, extra):
    out = tmp_path / "run"
    main(TINY + ["--data_path", str(SHARED_DATA / folder), "--epochs", "1", "--output_dir", str(out)] + extra)
    log = _log(out)[0]
    assert 0 <= log["test_acc_mim"] <= 1 and log["train_skipped_samples"] == 0
