"""--adamw_impl: the three AdamW implementations make the same update, and the flag reaches the
optimizer of both kinds of run."""
from __future__ import annotations

import pytest
import torch

from common.checkpoint_io import read_checkpoint
from models import create_model
from training.optim import ADAMW_IMPLS, adamw


def test_every_implementation_makes_the_same_update():
    results = {}
    for impl in ADAMW_IMPLS:
        torch.manual_seed(0)
        model = create_model("vlmo_tiny_patch16", img_size=32, patch_size=8)
        optimizer = adamw(model, 1e-3, 0.05, (0.9, 0.999), impl)
        for step in range(3):
            for i, param in enumerate(model.parameters()):
                param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(100 * step + i))
            optimizer.step()
        results[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    start = torch.cat([p.detach().flatten() for p in create_model("vlmo_tiny_patch16", img_size=32, patch_size=8)
                       .requires_grad_(False).parameters()])
    assert (results["for_loop"] - start).abs().max() > 1e-3  # the steps moved the weights
    for impl in ("foreach", "fused"):
        assert torch.allclose(results[impl], results["for_loop"], atol=1e-6, rtol=0), impl


def optimizer_switches(checkpoint_path) -> dict:
    group = read_checkpoint(checkpoint_path).extra["optimizer"]["param_groups"][0]
    return {"foreach": group["foreach"], "fused": group["fused"]}


@pytest.mark.parametrize("impl, switches", [("fused", {"foreach": None, "fused": True}),
                                            ("for_loop", {"foreach": False, "fused": None})])
def test_the_flag_reaches_the_optimizer_of_both_kinds_of_run(impl, switches, tmp_path):
    """What each run's checkpoint records of its optimizer."""
    from main_finetune import main as finetune
    from main_pretrain_cook import main as pretrain
    from tests.helpers import colour_folders
    from tests.test_finetune import FAST
    from tests.test_pretrain_cli import SYNTH, TINY

    pretrain(TINY + SYNTH + ["--epochs", "1", "--adamw_impl", impl, "--output_dir", str(tmp_path / "pre")])
    assert optimizer_switches(tmp_path / "pre" / "checkpoint-0.pth") == switches
    folders = colour_folders(tmp_path / "data", 24, 8, render_size=32)
    finetune(["--task", "image_classification", "--data_path", str(folders), "--epochs", "1", "--adamw_impl", impl,
              "--output_dir", str(tmp_path / "ft")] + FAST)
    assert optimizer_switches(tmp_path / "ft" / "checkpoint-best.pth") == switches
