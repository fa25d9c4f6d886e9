"""End-to-end runs of the continual modes on tiny configs: every mode with LoRA and
self-regularization on synthetic data, the stage chain through merged checkpoints, real captions
and Flickr8k pairs from ../shared, and the flag errors."""
from __future__ import annotations

import json
import re

import pytest
import torch

from common.checkpoint_io import read_checkpoint
from main_pretrain_cook import main
from tests.helpers import SHARED, SHARED_DATA, requires_shared
from tests.test_pretrain_cli import SYNTH, TINY, TINY_BASE, tiny_for
from util.train_text_tokenizer import main as train_tokenizer

BERT = SHARED / "tokenizers" / "bert-base-uncased"


@pytest.fixture(scope="module")
def word_pieces(tmp_path_factory):
    return str(train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "200", "--output",
                                str(tmp_path_factory.mktemp("tok") / "tok")]))


def _log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_the_chain_through_merged_checkpoints(tmp_path, word_pieces, capsys):
    common = SYNTH + ["--tokenizer", word_pieces, "--epochs", "1"]
    main(TINY + common + ["--output_dir", str(tmp_path / "mim")])
    mim_head = read_checkpoint(tmp_path / "mim" / "checkpoint-0.pth").model["mim_head.proj.weight"]

    lora = ["--lora_rank", "4", "--lora_alpha", "8", "--self_regularization", "--reg_loss_weight", "10",
            "--save_merged_lora_model"]
    main(TINY_BASE + common + lora + ["--exp_name", "text_mlm", "--init_from", str(tmp_path / "mim" / "checkpoint-0.pth"),
                          "--output_dir", str(tmp_path / "mlm")])
    out = capsys.readouterr().out
    assert "starting a new stage from the weights" in out and "LoRA adapters" in out
    assert "new heads: mlm_head; kept unused for later stages: mim_head" in out
    assert re.search(r"epoch 0: .* train loss_reg \d", out)  # the epoch line shows the penalty log.txt has
    log = _log(tmp_path / "mlm")[0]
    assert {"train_loss_mlm", "train_acc_mlm", "train_loss_reg", "test_acc_mlm"} <= set(log)
    merged = read_checkpoint(tmp_path / "mlm" / "merged_model.safetensors")
    assert not any(".lora_" in k for k in merged.model)
    assert torch.equal(merged.model["mim_head.proj.weight"], mim_head)  # earlier heads travel with the backbone
    adapters = read_checkpoint(tmp_path / "mlm" / "adapters.safetensors")
    assert adapters.model and all(".lora_" in k for k in adapters.model)
    # the standalone merger gives the same file from the run checkpoint, and never overwrites
    from util.save_merged_lora_model import main as merge_cli

    merge_cli([str(tmp_path / "mlm" / "checkpoint-0.pth"), str(tmp_path / "again.safetensors")])
    again = read_checkpoint(tmp_path / "again.safetensors")
    assert again.model.keys() == merged.model.keys()
    assert all(torch.equal(again.model[k], merged.model[k]) for k in merged.model)
    with pytest.raises(SystemExit):
        merge_cli([str(tmp_path / "mlm" / "checkpoint-0.pth"), str(tmp_path / "again.safetensors")])
    with pytest.raises(SystemExit):  # a full-training checkpoint has nothing to merge
        merge_cli([str(tmp_path / "mim" / "checkpoint-0.pth"), str(tmp_path / "x.safetensors")])

    # evaluating a LoRA run checkpoint needs no LoRA flags: they come from the checkpoint
    stats = main(TINY_BASE + common + ["--exp_name", "text_mlm", "--eval", "--resume", str(tmp_path / "mlm" / "checkpoint-0.pth"),
                           "--output_dir", str(tmp_path / "mlm")])
    assert stats["acc_mlm"] == pytest.approx(log["test_acc_mlm"], abs=1e-6)
    assert "using --lora_rank 4 --lora_alpha 8" in capsys.readouterr().out
    main(TINY_BASE + common + lora + ["--exp_name", "image_text_itc", "--init_from", str(tmp_path / "mlm" / "merged_model.safetensors"),
                          "--output_dir", str(tmp_path / "itc")])
    assert {"train_loss_itc", "test_acc_i2t", "test_acc_t2i"} <= set(_log(tmp_path / "itc")[0])
    # a LoRA run checkpoint also starts a stage: its adapters are folded in once; VLMo's ITM and
    # image-conditioned MLM join the compound objectives through LoRA too
    main(TINY + common + ["--exp_name", "compound_pretrain", "--lora_rank", "4", "--init_from",
                   str(tmp_path / "itc" / "checkpoint-0.pth"), "--d_vae_weight_path",
                   str(tmp_path / "mim" / "visual_tokenizer.safetensors"), "--itm_conduct_prob", "0.5", "--fused_mlm",
                   "--output_dir", str(tmp_path / "compound")])
    log = _log(tmp_path / "compound")[0]
    assert {"test_acc_mim", "test_acc_mlm", "test_acc_i2t", "test_acc_itm"} <= set(log)


@pytest.mark.parametrize("mode", ["text_mlm", "image_text_itc", "compound_pretrain"])
def test_full_training_of_each_mode_and_resume(tmp_path, word_pieces, mode):
    """Without LoRA the mode trains the whole backbone (minus paths it never uses); runs resume."""
    common = tiny_for(mode) + SYNTH + ["--tokenizer", word_pieces, "--exp_name", mode, "--epochs", "2", "--save_per_epochs", "1",
                             "--ffn", "multiway"]
    main(common + ["--output_dir", str(tmp_path / "a")])
    log = _log(tmp_path / "a")
    assert len(log) == 2 and log[1]["train_loss"] < 20
    ckpt = read_checkpoint(tmp_path / "a" / "checkpoint-1.pth")
    assert not any(".lora_" in k for k in ckpt.model)


@pytest.mark.parametrize("argv, message", [
    (["--exp_name", "image_mim", "--lora_rank", "4"], "--lora_rank adapts a stage started from earlier weights"),
    (["--exp_name", "text_mlm", "--self_regularization"], "--self_regularization regularizes LoRA updates"),
    (["--exp_name", "text_mlm", "--save_merged_lora_model"], "--save_merged_lora_model is read only by runs with --lora_rank above 0: nothing in this run reads it; a full run's"),
    (["--exp_name", "text_mlm", "--max_text_len", "300"], "--max_text_len 300 must be between"),
    (["--exp_name", "text_mlm", "--data_file_path", "nope.json"], "--data_file_path nope.json does not exist"),
    (["--exp_name", "text_mlm", "--lora_rank", "4", "--trainable_extra", "zzz*"], "--trainable_extra zzz* matches no"),
])
def test_continual_flag_errors(tmp_path, capsys, word_pieces, argv, message):
    with pytest.raises(SystemExit) as info:
        main(tiny_for(argv[1]) + SYNTH + ["--tokenizer", word_pieces, "--output_dir", str(tmp_path / "o")] + argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_untrained_text_embeddings_follow_the_tokenizer_and_trained_ones_are_kept(tmp_path, word_pieces, capsys):
    main(TINY + SYNTH + ["--epochs", "1", "--output_dir", str(tmp_path / "mim")])  # text path never trained
    main(TINY_BASE + SYNTH + ["--exp_name", "text_mlm", "--tokenizer", word_pieces, "--epochs", "1", "--init_from",
                         str(tmp_path / "mim" / "checkpoint-0.pth"), "--output_dir", str(tmp_path / "mlm")])
    out = capsys.readouterr().out
    assert "text embeddings were never trained, so they are created for the" in out and "(the file had 30522)" in out
    other = train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "100", "--output", str(tmp_path / "tok2")])
    with pytest.raises(SystemExit):  # the MLM stage trained them: refused, naming the tokenizer to use
        main(TINY_BASE + SYNTH + ["--exp_name", "text_mlm", "--tokenizer", str(other), "--init_from",
                             str(tmp_path / "mlm" / "checkpoint-0.pth"), "--output_dir", str(tmp_path / "mlm2")])
    err = capsys.readouterr().err
    assert "has a trained" in err and f"(--tokenizer {word_pieces})" in err


@requires_shared
@pytest.mark.skipif(not BERT.is_dir(), reason="../shared/tokenizers is not present")
@pytest.mark.parametrize("mode, data", [
    ("text_mlm", ["--data_file_path", str(SHARED_DATA / "flickr8k_captions_40k.json"), str(SHARED_DATA / "alt_text_10k.json")]),
    ("image_text_itc", ["--data_file_path", str(SHARED_DATA / "flickr8k_1k" / "captions.json")]),
    ("compound_pretrain", ["--data_file_path", str(SHARED_DATA / "flickr8k_1k" / "captions.json")]),
])
def test_real_captions_and_pairs(tmp_path, mode, data):
    out = tmp_path / "run"
    main(tiny_for(mode) + data + ["--exp_name", mode, "--tokenizer", str(BERT), "--epochs", "1", "--lora_rank", "4",
                        "--self_regularization", "--max_train_samples", "32", "--max_val_samples", "16",
                        "--output_dir", str(out)])
    log = _log(out)[0]
    assert log["train_skipped_samples"] == 0 and log["train_loss"] > 0
