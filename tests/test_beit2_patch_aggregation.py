"""BEiT v2 pretraining checkpoints and patch aggregation. A random BEiT v2 MIM model is written in
microsoft/unilm's layout ({'model': ...}: a timm BEiT's encoder, mask_token, lm_head, and
`cls_pt_layers` made of timm BEiT blocks, which are the same blocks as theirs), converted, and run
by image_mim with --early_layers: both of its predictions equal the re-computation BEiT v2's
forward_features performs with the timm modules (1e-4). The flags end to end, resume refusals."""
from __future__ import annotations

import pytest
import timm
import timm.models.beit as timm_beit
import torch

from custom_datasets import batch as B
from models import create_model
from models.checkpoints import read_model_checkpoint
from models.modes.base import ModeOptions
from models.modes.image_mim import ImageMIM, aggregated_mim_logits
from tests.helpers import max_diff, randomize_
from util.convert_beit_ckpt import main as convert_main

TOL, DIM, HEADS, DEPTH, EARLY, VOCAB, GRID = 1e-4, 64, 4, 4, 2, 128, 4


def _beit2_reference():
    encoder = randomize_(timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                           embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=0,
                                           global_pool="token"), scale=0.1).eval()
    cls_pt = torch.nn.ModuleList(timm_beit.Block(DIM, HEADS, qkv_bias=True, init_values=0.1, window_size=(GRID, GRID))
                                 for _ in range(2))
    randomize_(cls_pt, seed=5, scale=0.1).eval()
    lm_head = randomize_(torch.nn.Linear(DIM, VOCAB), seed=6)
    mask_token = torch.randn(1, 1, DIM, generator=torch.Generator().manual_seed(7)) * 0.1
    return encoder, cls_pt, lm_head, mask_token


def _write_unilm_layout(path, encoder, cls_pt, lm_head, mask_token) -> None:
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    state.update({f"cls_pt_layers.{k}": v for k, v in cls_pt.state_dict().items()})
    state.update({"mask_token": mask_token, "lm_head.weight": lm_head.weight.detach(), "lm_head.bias": lm_head.bias.detach()})
    torch.save({"model": state}, path)


@torch.no_grad()
def _reference_logits(encoder, cls_pt, lm_head, mask_token, images, mask):
    """BEiT v2's VisionTransformerForMaskedImageModelingCLS.forward_features, then both LM heads."""
    x = encoder.patch_embed(images)
    w = mask.unsqueeze(-1).type_as(x)
    x = x * (1 - w) + mask_token * w
    x = torch.cat([encoder.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    for i, block in enumerate(encoder.blocks):
        x = block(x, shared_rel_pos_bias=None)
        if i + 1 == EARLY:
            early = x[:, 1:]
    aggregated = torch.cat([x[:, [0]], early], dim=1)
    for block in cls_pt:
        aggregated = block(aggregated, shared_rel_pos_bias=None)
    top, aggregated = encoder.norm(x)[:, 1:], encoder.norm(aggregated)[:, 1:]
    return lm_head(top[mask]), lm_head(aggregated[mask])


def _converted(tmp_path, capsys):
    reference = _beit2_reference()
    _write_unilm_layout(tmp_path / "beitv2_pt.pth", *reference)
    out = tmp_path / "beitv2.safetensors"
    convert_main(["--input", str(tmp_path / "beitv2_pt.pth"), "--output", str(out), "--early_layers", str(EARLY)])
    assert "kept as cls_pt_head" in capsys.readouterr().out
    return reference, out


def test_converted_beit2_patch_aggregation_equals_the_recomputation(tmp_path, capsys):
    from training.weights import attach_heads

    reference, path = _converted(tmp_path, capsys)
    ckpt = read_model_checkpoint(str(path))
    assert ckpt.info["heads"]["cls_pt_head"]["early_layers"] == EARLY
    backbone = create_model(None, pretrained=str(path)).eval()
    mode = ImageMIM(backbone, ModeOptions(visual_vocab_size=VOCAB, patch_aggregation=(EARLY, 2, True))).eval()
    attach_heads(mode, ckpt)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=gen)
    mask = torch.rand(3, GRID * GRID, generator=gen) < 0.4
    batch = {B.IMAGE: images, B.MASKED_PATCHES: mask, B.VISUAL_TOKENS: torch.zeros(3, GRID * GRID, dtype=torch.long)}
    with torch.no_grad():
        (top, aggregated), _ = aggregated_mim_logits(backbone, mode.mim_head, mode.cls_pt_head, batch)
    expected_top, expected_aggregated = _reference_logits(*reference, images, mask)
    assert max_diff(top, expected_top) <= TOL and max_diff(aggregated, expected_aggregated) <= TOL
    assert max_diff(aggregated, top) > 1e-2  # the aggregation is a different prediction


def _tiny(out, *extra):
    return ["--device", "cpu", "--model", "vlmo_tiny_patch16", "--image_size", "32", "--patch_size", "8",
            "--second_image_size", "16", "--visual_vocab_size", "16", "--tokenizer_fit_images", "64", "--batch_size", "8",
            "--num_workers", "0", "--data_path", "synthetic", "--synthetic_train_size", "32", "--synthetic_val_size", "16",
            "--synthetic_render_size", "32", "--min_mask_patches_per_block", "4", "--no_pictures", "--output_dir",
            str(out), *extra]


@pytest.mark.parametrize("shared", [True, False])
def test_image_mim_with_patch_aggregation_trains_and_resumes_only_as_it_was(tmp_path, capsys, shared):
    import json

    from main_pretrain_cook import main

    out = tmp_path / "mim"
    flags = ["--early_layers", "2", "--head_layers", "1"] + ([] if shared else ["--no-shared_lm_head"])
    main(_tiny(out, "--epochs", "1", *flags))
    log = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert {"train_loss_mim", "train_loss_mim_agg"} <= set(log)
    assert log["train_loss"] == pytest.approx(log["train_loss_mim"] + log["train_loss_mim_agg"], rel=1e-5)
    ckpt = read_model_checkpoint(str(out / "checkpoint-0.pth"))
    head = {k for k in ckpt.model if k.startswith("cls_pt_head.")}
    assert any(".cls_pt_layers.0." in k for k in head) and not any(".cls_pt_layers.1." in k for k in head)
    assert any("cls_pt_lm_head" in k for k in head) is not shared
    main(_tiny(out, "--epochs", "2", "--resume", str(out / "checkpoint-0.pth"), "--d_vae_weight_path",
               str(out / "visual_tokenizer.safetensors"), *flags))
    assert "resuming run from" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # without the aggregation, the checkpoint's heads mean something else
        main(_tiny(tmp_path / "other", "--epochs", "3", "--resume", str(out / "checkpoint-1.pth"),
                   "--d_vae_weight_path", str(out / "visual_tokenizer.safetensors")))
    assert "was trained with --early_layers 2" in capsys.readouterr().err


def test_patch_aggregation_flags_are_checked(tmp_path, capsys):
    from main_pretrain_cook import main

    for extra, says in ((["--early_layers", "9"], "--early_layers 9: the backbone has blocks 1..4"),
                        (["--early_layers", "2", "--exp_name", "text_mlm"],
                         "--early_layers is read only by --exp_name image_mim, and this run's is text_mlm"),
                        (["--head_layers", "3"], "--head_layers is read only by runs with --early_layers")):
        with pytest.raises(SystemExit):
            main(_tiny(tmp_path / "x", "--epochs", "1", *extra))
        assert says in capsys.readouterr().err
