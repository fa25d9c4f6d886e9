"""Training a VQ-KD tokenizer: the codebook's k-means start, EMA step and dead-code restart against
hand-computed values; usage and perplexity; the written tokenizer round-trips; util/train_vqkd.py
end to end on the synthetic world with a pretraining stage as teacher (its loss falls, its codebook
stays in use, --resume continues, and an image MIM stage trains on its ids: the chain's loop)."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from models.visual_tokenizers import create_visual_tokenizer
from models.visual_tokenizers.vqkd import NormEmaQuantizer, load_vqkd_tokenizer, save_vqkd_tokenizer
from models.visual_tokenizers.vqkd_codebook import (cosine_kmeans, ema_update_, kmeans_init_, restart_dead_codes_,
                                                     usage_and_perplexity)
from models.visual_tokenizers.vqkd_model import VqkdAutoencoder, VqkdShape
from models.visual_tokenizers.vqkd_vit import VitShape


def test_cosine_kmeans_finds_three_directions():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(3)
    samples = F.normalize(centres.repeat_interleave(20, 0) + 0.05 * torch.randn(60, 3, generator=gen), dim=-1)
    means = cosine_kmeans(samples, 3, gen=gen)
    expected = torch.stack([F.normalize(samples[i * 20:(i + 1) * 20].mean(0), dim=0) for i in range(3)])
    order = (means @ centres.t()).argmax(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    assert torch.allclose(means, expected[order], atol=1e-6)


def test_kmeans_start_happens_once():
    quantizer = NormEmaQuantizer(4, 3)
    z = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    assert kmeans_init_(quantizer, z) and quantizer.embedding.initted.item() == 1
    before = quantizer.embedding.weight.clone()
    assert not kmeans_init_(quantizer, torch.randn(40, 3))
    assert torch.equal(quantizer.embedding.weight, before)
    assert torch.allclose(before.norm(dim=1), torch.ones(4))


def test_ema_step_moves_used_codes_towards_their_mean_and_keeps_the_rest():
    quantizer = NormEmaQuantizer(3, 2)
    codes = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    quantizer.embedding.weight.copy_(codes)
    z = torch.tensor([[2.0, 1.0], [2.0, -1.0], [0.0, 3.0]])
    ids = torch.tensor([0, 0, 1])
    counts = ema_update_(quantizer, z, ids, decay=0.9)
    assert counts.tolist() == [2.0, 1.0, 0.0]
    unit = F.normalize(z, dim=-1)
    mean0 = F.normalize(unit[:2].mean(0), dim=0)
    assert torch.allclose(quantizer.embedding.weight[0], F.normalize(0.9 * codes[0] + 0.1 * mean0, dim=0))
    assert torch.allclose(quantizer.embedding.weight[1], codes[1])  # its mean is itself
    assert torch.equal(quantizer.embedding.weight[2], codes[2])  # unused: stays
    assert torch.allclose(quantizer.cluster_size, torch.tensor([0.2, 0.1, 0.0]))


def test_dead_codes_restart_from_the_batch():
    quantizer = NormEmaQuantizer(4, 2)
    quantizer.cluster_size.copy_(torch.tensor([5.0, 0.001, 5.0, 0.0]))
    kept = quantizer.embedding.weight[[0, 2]].clone()
    z = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    assert restart_dead_codes_(quantizer, z, 0.1, torch.Generator().manual_seed(0)) == 2
    unit = F.normalize(z, dim=-1)
    for code in (1, 3):
        assert any(torch.allclose(quantizer.embedding.weight[code], u) for u in unit)
    assert torch.equal(quantizer.embedding.weight[[0, 2]], kept)
    assert quantizer.cluster_size.tolist() == pytest.approx([5.0, 0.1, 5.0, 0.1])


def test_usage_and_perplexity():
    assert usage_and_perplexity(torch.tensor([2.0, 2.0, 0.0, 0.0])) == (0.5, pytest.approx(2.0))
    assert usage_and_perplexity(torch.tensor([1.0, 1, 1, 1]))[1] == pytest.approx(4.0)
    assert usage_and_perplexity(torch.zeros(3)) == (0.0, 0.0)


def test_the_written_tokenizer_round_trips(tmp_path):
    torch.manual_seed(0)
    model = VqkdAutoencoder(VqkdShape(VitShape(32, 8, 3, 128, 2, 2), 16, 8, 1, 48))
    kmeans_init_(model.tokenizer.quantize, torch.randn(64, 8))
    save_vqkd_tokenizer(model.tokenizer, tmp_path / "t.safetensors", {"teacher": "x.pth", "image_size": 32})
    loaded = load_vqkd_tokenizer(tmp_path / "t.safetensors")
    images = torch.rand(4, 3, 32, 32)
    assert torch.equal(loaded.get_codebook_indices(images), model.tokenizer.eval().get_codebook_indices(images))
    assert loaded.info["teacher"] == "x.pth" and loaded.encoder.shape == model.tokenizer.encoder.shape


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from main_pretrain_cook import main

    out = tmp_path_factory.mktemp("teacher")
    main(["--exp_name", "image_mim", "--data_path", "synthetic", "--synthetic_train_size", "64", "--synthetic_val_size",
          "16", "--synthetic_render_size", "32", "--model", "vlmo_tiny_patch16", "--image_size", "32", "--patch_size", "8",
          "--second_image_size", "16", "--visual_vocab_size", "16", "--tokenizer_fit_images", "64", "--batch_size", "16",
          "--epochs", "1", "--num_workers", "0", "--min_mask_patches_per_block", "4", "--no_pictures", "--device", "cpu",
          "--output_dir", str(out)])
    return str(out / "checkpoint-0.pth")


def _epochs(text: str) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in re.findall(r"(\w+) (-?\d[\d.e+-]*)", line.split(":", 1)[1])}
            for line in text.splitlines() if re.match(r"epoch \d+: ", line)]


def test_train_vqkd_end_to_end_then_mim_on_its_tokens(tmp_path, teacher, capsys):
    from main_pretrain_cook import main as pretrain
    from util.train_vqkd import main

    out = tmp_path / "vq.safetensors"
    flags = ["--teacher", teacher, "--output", str(out), "--image_size", "32", "--patch_size", "8",
             "--synthetic_train_size", "256", "--batch_size", "32", "--codebook_size", "64", "--num_workers", "0"]
    main([*flags, "--epochs", "2"])
    first = _epochs(capsys.readouterr().out)
    stats = main([*flags, "--epochs", "4", "--resume"])
    text = capsys.readouterr().out
    assert "resuming from" in text and "at epoch 2" in text
    epochs = first + _epochs(text)
    assert len(epochs) == 4
    assert epochs[-1]["train_rec_loss"] < 0.7 * epochs[0]["train_rec_loss"]  # the cosine loss falls
    assert stats["val_usage"] >= 0.1 and stats["val_perplexity"] > 3  # the codebook stays in use
    tokenizer = create_visual_tokenizer("vqkd", out, 32, expected_grid=4)
    assert tokenizer.vocab_size == 64 and tokenizer.info["teacher"] == teacher and tokenizer.info["epochs"] == 4
    assert out.with_suffix(".tokens.png").is_file()
    with pytest.raises(SystemExit):
        main([*flags, "--epochs", "1"])
    assert "already exists" in capsys.readouterr().err
    mim = tmp_path / "mim"
    pretrain(["--exp_name", "image_mim", "--data_path", "synthetic", "--synthetic_train_size", "32",
              "--synthetic_val_size", "16", "--synthetic_render_size", "32", "--model", "vlmo_tiny_patch16",
              "--image_size", "32", "--patch_size", "8", "--second_image_size", "32", "--d_vae_type", "vqkd",
              "--d_vae_weight_path", str(out), "--batch_size", "8", "--epochs", "1", "--num_workers", "0",
              "--min_mask_patches_per_block", "4", "--no_pictures", "--device", "cpu", "--output_dir", str(mim)])
    log = [json.loads(line) for line in (mim / "log.txt").read_text().splitlines()]
    assert math.isfinite(log[-1]["test_loss"])


def test_bad_teacher_and_model_are_one_sentence(tmp_path):
    from training.vqkd_training import VqkdSettings, build_vqkd_run

    with pytest.raises(UserError, match="--teacher .* does not exist"):
        build_vqkd_run(VqkdSettings("synthetic", str(tmp_path / "none.pth"), str(tmp_path / "o.safetensors")))
    with pytest.raises(UserError, match="--model vit_huge is not a VQ-KD encoder"):
        build_vqkd_run(VqkdSettings("synthetic", "x", str(tmp_path / "o.safetensors"), model="vit_huge"))


def _ddp_worker(rank: int, world: int, teacher_path: str, out: str) -> None:
    from training.vqkd_training import VqkdSettings, build_vqkd_run, train_epoch

    run = build_vqkd_run(VqkdSettings("synthetic", teacher_path, f"{out}/vq.safetensors", image_size=32, patch_size=8,
                                      epochs=1, batch_size=16, codebook_size=32, synthetic_train_size=128,
                                      num_workers=0))
    train_epoch(run, 0)
    torch.save({k: v for k, v in run.model.state_dict().items()}, f"{out}/rank{rank}.pt")


def test_ddp_keeps_one_codebook_and_one_model_on_every_process(tmp_path, teacher):
    """Two gloo processes: the codebook (k-means start from rank 0, EMA over both ranks' counts and
    sums, restarts from rank 0's batch) and the weights are the same on both after an epoch."""
    from tests.distributed_harness import run_in_processes

    run_in_processes(_ddp_worker, 2, teacher, str(tmp_path))
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    assert states[0]["tokenizer.quantize.embedding.initted"].item() == 1


@pytest.mark.parametrize("layout", ["timm", "huggingface"])
def test_a_beit_in_timm_or_hugging_face_layout_teaches_as_its_conversion_does(tmp_path, layout):
    """A teacher given as a timm state dict or an HF folder gives the features of its converted file."""
    import timm
    import transformers

    from models import create_model
    from tests.helpers import randomize_
    from training.vqkd_teacher import Teacher
    from util.convert_beit_ckpt import main as convert

    if layout == "timm":
        ref = randomize_(timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                           embed_dim=64, depth=2, num_heads=4, num_classes=0), scale=0.1)
        source = tmp_path / "timm_beit.pth"
        torch.save(ref.state_dict(), source)
    else:
        cfg = transformers.BeitConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                      image_size=32, patch_size=8, layer_norm_eps=1e-6, use_mask_token=True)
        source = tmp_path / "hf_beit"
        randomize_(transformers.BeitForMaskedImageModeling(cfg), scale=0.1).save_pretrained(source)
    convert(["--input", str(source), "--output", str(tmp_path / "converted.safetensors")])
    teacher = Teacher(source, grid=4)
    images = torch.rand(2, 3, 32, 32)
    converted = create_model(None, pretrained=str(tmp_path / "converted.safetensors")).eval()
    with torch.no_grad():
        expected = converted.encode_image((images - 0.5) / 0.5)[:, 1:]
    assert torch.allclose(teacher(images), expected, atol=1e-5) and teacher.dim == 64
