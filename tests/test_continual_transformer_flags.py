"""ContinualTransformer's flags, mode names and defaults: each one either means the same here or
is refused with one sentence saying what to use instead; `--preset continual_transformer` gives
their defaults; no run falls back to the synthetic world without being asked."""
from __future__ import annotations

import pytest
import torch

from common.errors import UserError
from main_pretrain_cook import main
from models import create_model
from models.lora import add_lora, self_regularization
from models.modes import ImageTextITC
from models.trainability import configure_trainable
from training.cli import pretrain_config_from_argv

SYNTH = ["--data_path", "synthetic"]


def config(*argv):
    return pretrain_config_from_argv(list(argv))


def test_the_preset_gives_their_defaults_and_explicit_flags_still_win():
    cfg = config("--preset", "continual_transformer", "--exp_name", "image_text_itc", "--lora_rank", "8", *SYNTH,
                 "--blr", "5e-4")
    o, v, lo, r = cfg.optim, cfg.views, cfg.lora, cfg.run
    assert (o.opt_betas, o.clip_grad, o.min_lr, o.warmup_epochs, o.epochs, o.blr) == ((0.9, 0.95), None, 0.0, 40, 400, 5e-4)
    assert (v.imagenet_default_mean_and_std, v.mask_strategy, v.mim_probability) == (True, "random", 0.55)
    assert (lo.lora_alpha, lo.reg_delta, lo.lora_trainable) == (1.0, "unscaled", "B")  # their image-text stages: B only
    assert (r.save_per_epochs, r.save_epochs_from_zero, r.gpu_amp) == (20, True, "fp16")
    assert cfg.text.max_text_len == 196 and cfg.visual_tokenizer.d_vae_type == "dall-e"
    assert config("--preset", "continual_transformer", "--exp_name", "text_mlm", "--lora_rank", "8",
                  *SYNTH).lora.lora_trainable == "both"
    plain = config("--exp_name", "image_text_itc", *SYNTH)
    assert plain.optim.opt_betas == (0.9, 0.999) and plain.optim.clip_grad == 3.0


def test_their_spellings_mean_the_same():
    cfg = config("--exp_name", "image_text_itc_loraA", "--lora_rank", "4", "--drop_path_rate", "0.3",
                 "--disable_aggregate_itc", "--local-rank=1", "--no_pin_mem",
                 "--preset", "continual_transformer", "--disable_imagenet_default_mean_and_std", *SYNTH)
    assert cfg.exp_name == "image_text_itc" and cfg.lora.lora_trainable == "A"
    assert cfg.model.drop_path == 0.3 and cfg.objectives.aggregate_itc is False and cfg.data.pin_mem is False
    assert cfg.views.imagenet_default_mean_and_std is False
    assert config("--exp_name", "image_mim", "--img_vocab_size", "300", *SYNTH).visual_tokenizer.visual_vocab_size == 300
    assert config("--exp_name", "image_text_itc_fullmodel", *SYNTH).lora.lora_rank == 0


@pytest.mark.parametrize("argv, message", [
    (["--exp_name", "image_text_itc_fullmodel", "--lora_rank", "4"], "trains the whole model; drop --lora_rank 4"),
    (["--dist_url", "tcp://10.0.0.1:23456"], "through env:// only; start them with torchrun"),
    (["--world_size", "8"], "--world_size 8 but 1 process(es) were started"),
    (["--exp_name", "image_text_itc", "--webdataset", "--data_path", "x/{0..1}.tar", "--train_data_upsampling_factors",
      "1::2"], "--train_data_upsampling_factors is not supported: write the sources' shards into one list"),
])
def test_flags_that_cannot_mean_the_same_are_refused(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(*(argv if "--data_path" in argv else argv + SYNTH))


@pytest.mark.parametrize("mode, needs", [("image_mim", "--data_path IMAGE_FOLDER"),
                                         ("text_mlm", "--data_file_path CAPTIONS.json"),
                                         ("image_text_itc", "--data_file_path PAIRS.json")])
def test_no_run_falls_back_to_the_synthetic_world(mode, needs, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--exp_name", mode])
    err = capsys.readouterr().err
    assert info.value.code == 2 and needs in err and "--data_path synthetic" in err


def test_only_the_chosen_lora_factors_train():
    backbone = create_model("vlmo_tiny_patch16", img_size=32, patch_size=8)
    mode = ImageTextITC(backbone)
    add_lora(backbone, 4, 1.0)
    configure_trainable(mode, True, lora_factors="B")
    trained = {n for n, p in mode.named_parameters() if p.requires_grad and ".lora_" in n}
    assert trained and all(".lora_B." in n for n in trained)


def test_their_unscaled_penalty_is_ours_over_scaling_squared():
    torch.manual_seed(0)
    backbone = create_model("vlmo_tiny_patch16", img_size=32, patch_size=8)
    add_lora(backbone, 4, 1.0)  # their alpha 1: scaling 1/4
    for name, p in backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert self_regularization(backbone, scaled=False).item() == pytest.approx(
        self_regularization(backbone).item() * 16, rel=1e-5)


def test_their_checkpoint_numbering_and_a_start_epoch(tmp_path):
    from tests.test_pretrain_cli import SYNTH as SMALL
    from tests.test_pretrain_cli import TINY

    main(TINY + SMALL + ["--epochs", "3", "--save_per_epochs", "2", "--save_epochs_from_zero", "--start_epoch", "1",
                         "--output_dir", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pth")) == ["checkpoint-2.pth"]  # epochs 1, 2 run; 2 saved
