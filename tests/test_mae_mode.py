"""The image_mae mode: the encoder never sees a masked patch, the pixel targets are MAE's, masks
keep the same number of patches per image, a run resumes mid-epoch exactly, and an MAE image stage
hands over to a text stage with LoRA + self-regularization."""
from __future__ import annotations

import json
import random

import pytest
import torch

from custom_datasets.masking import FractionMaskGenerator
from main_pretrain_cook import main
from models import create_model
from models.mae_decoder import patchify, pixel_targets, unpatchify
from models.modes import ImageMAE, ModeOptions
from models.modes.image_mae import MAEShape, visible_patches
from tests.helpers import randomize_
from tests.test_bad_inputs import refused
from tests.test_pretrain_cli import SYNTH, TINY_BASE

MAE_RUN = TINY_BASE + SYNTH + ["--exp_name", "image_mae"]


@pytest.mark.parametrize("positions", ["relative bias", "absolute"])
def test_the_encoder_never_sees_a_masked_patch(positions):
    extra = {} if positions == "relative bias" else dict(use_rel_pos_bias=False, use_abs_pos_emb=True)
    backbone = randomize_(create_model("vlmo_tiny_patch16", img_size=32, patch_size=8, **extra)).eval()
    images = torch.randn(3, 3, 32, 32)
    mask = torch.stack([torch.from_numpy(FractionMaskGenerator((4, 4), 0.75)(random.Random(i)).reshape(-1))
                        for i in range(3)])
    visible = visible_patches(mask)
    changed = images.clone()
    pixel_mask = mask.view(3, 1, 4, 1, 4, 1).expand(3, 3, 4, 8, 4, 8).reshape(3, 3, 32, 32)
    changed[pixel_mask] = torch.randn(int(pixel_mask.sum()))  # every masked pixel replaced
    with torch.no_grad():
        before, after = backbone.encode_visible(images, visible), backbone.encode_visible(changed, visible)
        assert torch.equal(before, after)
        assert not torch.equal(backbone.encode_image(images), backbone.encode_image(changed))  # the full view does see them


def test_a_visible_patch_is_encoded_as_in_the_full_sequence_less_the_others():
    """With every patch visible the visible-only encoder is the ordinary one (positions included)."""
    backbone = randomize_(create_model("vlmo_tiny_patch16", img_size=32, patch_size=8)).eval()
    images = torch.randn(2, 3, 32, 32)
    everything = torch.arange(16).expand(2, -1)
    with torch.no_grad():
        assert torch.allclose(backbone.encode_visible(images, everything), backbone.encode_image(images), atol=1e-5)


def test_norm_pix_targets_are_each_patchs_standardised_pixels():
    images = torch.randn(2, 3, 16, 16)
    target = pixel_targets(images, 8, norm_pix=True)  # [2, 4, 192]
    patch = images[1, :, 8:16, 0:8]  # the third patch (row 1, column 0) of the second image
    pixels = patch.permute(1, 2, 0).reshape(-1)  # rows, columns, channels last: MAE's order
    expected = (pixels - pixels.mean()) / (pixels.var(unbiased=True) + 1e-6) ** 0.5
    assert torch.allclose(target[1, 2], expected, atol=1e-5)
    assert torch.equal(pixel_targets(images, 8, norm_pix=False)[1, 2], pixels)
    assert torch.equal(unpatchify(patchify(images, 8), 8, (2, 2)), images)


def test_masks_keep_the_same_number_of_patches_in_every_image():
    masker = FractionMaskGenerator((7, 7), 0.75)
    counts = {int(masker(random.Random(i)).sum()) for i in range(50)}
    assert counts == {49 - int(49 * 0.25)}  # MAE keeps int(N (1 - ratio)): 12 of 49
    with pytest.raises(ValueError, match="same number of patches"):
        visible_patches(torch.tensor([[True, False, False], [True, True, False]]))


def test_the_mode_learns_and_the_loss_is_maes():
    backbone = create_model("vlmo_tiny_patch16", img_size=32, patch_size=8, drop_path_rate=0.0)
    mode = ImageMAE(backbone, ModeOptions(mae=MAEShape(64, 1, 2, 0.75, True)))
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.stack([torch.from_numpy(FractionMaskGenerator((4, 4), 0.75)(random.Random(i)).reshape(-1))
                        for i in range(8)])
    optimizer = torch.optim.AdamW(mode.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = mode({"image": images, "bool_masked_pos": mask})["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_mask_ratio_and_norm_pix_loss_mean_something_only_to_image_mae(tmp_path, capsys):
    refused(lambda: main(TINY_BASE + SYNTH + ["--mask_ratio", "0.6", "--output_dir", str(tmp_path / "a")]),
            "--mask_ratio is read only by --exp_name image_mae, and this run's is image_mim", capsys=capsys)
    refused(lambda: main(TINY_BASE + SYNTH + ["--norm_pix_loss", "--output_dir", str(tmp_path / "b")]),
            "--norm_pix_loss is read only by --exp_name image_mae", capsys=capsys)
    refused(lambda: main(MAE_RUN + ["--mask_ratio", "0.999", "--output_dir", str(tmp_path / "c")]),
            "--mask_ratio 0.999 masks 16 of 16 patches", capsys=capsys)


def test_an_mae_stage_reports_draws_and_hands_over_to_a_text_stage_with_self_regularization(tmp_path, capsys):
    from util.train_text_tokenizer import main as train_tokenizer

    out = tmp_path / "mae"
    main(MAE_RUN + ["--epochs", "2", "--decoder_embed_dim", "64", "--decoder_depth", "1", "--decoder_num_heads", "2",
                    "--mask_ratio", "0.5", "--output_dir", str(out)])
    said = capsys.readouterr().out
    assert "held-out MAE loss" in said and "image_mae_r2" in said and "mae_reconstructions.png" in said
    report = json.loads((out / "stage_report.json").read_text())
    assert {"image_mae_loss", "image_mae_r2", "image_knn_acc"} <= set(report)
    from common.checkpoint_io import read_checkpoint

    spec = read_checkpoint(out / "checkpoint-1.pth").info["heads"]["mae_decoder"]
    assert (spec["mask_ratio"], spec["decoder_embed_dim"], spec["depth"], spec["norm_pix_loss"]) == (0.5, 64, 1, True)
    tok = train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "100", "--output", str(tmp_path / "tok")])
    text = tmp_path / "mlm"
    main(TINY_BASE + SYNTH + ["--exp_name", "text_mlm", "--tokenizer", str(tok), "--epochs", "1", "--lora_rank", "4",
                              "--self_regularization", "--reg_loss_weight", "100", "--save_merged_lora_model",
                              "--init_from", str(out / "checkpoint-1.pth"), "--output_dir", str(text)])
    said = capsys.readouterr().out
    assert "kept unused for later stages: mae_decoder" in said
    report = json.loads((text / "stage_report.json").read_text())
    assert "text_mlm_acc" in report and "image_mae_r2" in report  # the image stage's probe, measured after the text stage


def test_an_mae_run_resumes_mid_epoch_to_the_same_weights(tmp_path, monkeypatch):
    from tests.test_step_checkpoints import _resumed_equals_straight

    argv = MAE_RUN + ["--synthetic_train_size", "64", "--epochs", "2", "--drop_path", "0.1", "--save_every_steps", "3",
                      "--save_per_epochs", "5", "--no_pictures"]
    _resumed_equals_straight(argv, tmp_path, monkeypatch, "checkpoint-1-step4.pth")


def test_a_decoder_width_its_heads_do_not_divide_is_one_sentence(tmp_path, capsys):
    refused(lambda: main(MAE_RUN + ["--decoder_embed_dim", "30", "--decoder_num_heads", "4", "--epochs", "1",
                                    "--output_dir", str(tmp_path / "o")]),
            "--decoder_embed_dim 30 is not a multiple of --decoder_num_heads 4", capsys=capsys)
