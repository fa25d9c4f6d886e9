"""Bad weight files get one clear sentence, never a traceback, and never run pickled code."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from common.checkpoint_io import read_checkpoint
from common.errors import UserError
from conversion.beit import read_source
from models import create_model
from tests.helpers import ROOT


class _RunsCode:
    """Unpickling this would execute a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "util" / "convert_beit_ckpt.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_missing_file_is_one_sentence_from_the_cli(tmp_path):
    result = _run_cli("--input", tmp_path / "nope.pth", "--output", tmp_path / "out.safetensors")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "nope.pth does not exist" in result.stderr


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _RunsCode(marker)}, evil)
    with pytest.raises(UserError, match="needs to run pickled code.*never unpickles code"):
        read_checkpoint(evil)
    result = _run_cli("--input", evil, "--output", tmp_path / "o.safetensors")
    assert result.returncode == 2 and "never unpickles code" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"this is a caption file, not weights\n" * 10, "not a"),
    (b"", "empty"),
])
def test_files_that_are_not_checkpoints(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"model": {"w": torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="cut.pth is truncated"):
        read_checkpoint(path)
    bad_st = tmp_path / "cut.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(UserError, match="not a readable .safetensors"):
        read_checkpoint(bad_st)


def test_checkpoint_of_another_architecture(tmp_path):
    import torchvision
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(UserError, match="not part of a BEiT encoder.*another architecture"):
        read_source(path)
    with pytest.raises(UserError, match="not a checkpoint of this project.*convert_beit_ckpt.py"):
        create_model(None, pretrained=str(path))


def test_beit_of_another_size_for_a_named_model(tmp_path):
    import timm
    ref = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                            depth=2, num_heads=4)
    torch.save(ref.state_dict(), tmp_path / "small.pth")
    result = _run_cli("--input", tmp_path / "small.pth", "--output", tmp_path / "o.safetensors", "--model", "vlmo_base_patch16")
    assert result.returncode == 2
    assert "does not fit --model vlmo_base_patch16: embed_dim=64" in result.stderr


def test_output_is_never_overwritten_without_asking(tmp_path):
    import timm
    ref = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                            depth=1, num_heads=4)
    torch.save(ref.state_dict(), tmp_path / "src.pth")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    result = _run_cli("--input", tmp_path / "src.pth", "--output", out)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert out.read_bytes() == b"precious"
    assert _run_cli("--input", tmp_path / "src.pth", "--output", out, "--overwrite").returncode == 0
    assert create_model(None, pretrained=str(out)).cfg.embed_dim == 64


def test_tensors_sharing_memory_are_written_as_safetensors_each_whole(tmp_path):
    """A conversion to VLMo's experts starts them all as one BEiT FFN tensor; safetensors refuses
    shared memory, so the writer copies: every key is written with its values."""
    from common.checkpoint_io import save_weights

    ffn = torch.randn(8, 4)
    tensors = {"backbone.blocks.0.mlp_imag.fc1.weight": ffn, "backbone.blocks.0.mlp_text.fc1.weight": ffn,
               "backbone.blocks.0.mlp_vl.fc1.weight": ffn[:4], "backbone.other": torch.ones(3)}
    save_weights(tmp_path / "shared.safetensors", tensors, {})
    read = read_checkpoint(tmp_path / "shared.safetensors").model
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], v) for k, v in tensors.items())
