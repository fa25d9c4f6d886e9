"""BEiT v2's VQ-KD tokenizer: files in the layout microsoft/unilm releases (`{"model": state dict}`
of `modeling_vqkd.VQKD`: encoder ViT with q/v biases and fc_norm, the encode task layer, the EMA
codebook and its statistics, the decoder and its task layer, here with random weights at a small
width) load, and give exactly the ids of a re-computation written from that layout with plain
tensor operations; a crafted pickle is refused; an image MIM stage trains on its ids."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from models.visual_tokenizers import create_visual_tokenizer
from models.visual_tokenizers.vqkd import load_vqkd_tokenizer

WIDTH, DEPTH, PATCH, IMAGE, CODES, CODE_DIM = 128, 2, 8, 32, 64, 32  # heads: WIDTH / 64 = 2, as base's 768 / 12


def _vit(prefix: str, chans: int, patch: int, grid: int, depth: int, gen) -> dict[str, torch.Tensor]:
    """A VisionTransformer's state dict as BEiT v2's modeling_finetune names it (mean pooling:
    `norm` is Identity and has no tensors, `fc_norm` holds them; no head: num_classes 0)."""
    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=gen) * scale

    d = WIDTH
    state = {f"{prefix}cls_token": r(1, 1, d), f"{prefix}pos_embed": r(1, grid * grid + 1, d),
             f"{prefix}patch_embed.proj.weight": r(d, chans, patch, patch, scale=0.2),
             f"{prefix}patch_embed.proj.bias": r(d), f"{prefix}fc_norm.weight": 1 + r(d), f"{prefix}fc_norm.bias": r(d)}
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        state.update({b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d), b + "attn.q_bias": r(d), b + "attn.v_bias": r(d),
                      b + "attn.qkv.weight": r(3 * d, d, scale=0.1), b + "attn.proj.weight": r(d, d, scale=0.1),
                      b + "attn.proj.bias": r(d), b + "norm2.weight": 1 + r(d), b + "norm2.bias": r(d),
                      b + "mlp.fc1.weight": r(4 * d, d, scale=0.1), b + "mlp.fc1.bias": r(4 * d),
                      b + "mlp.fc2.weight": r(d, 4 * d, scale=0.1), b + "mlp.fc2.bias": r(d)})
    return state


def released_layout(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grid = IMAGE // PATCH
    state = {**_vit("encoder.", 3, PATCH, grid, DEPTH, gen), **_vit("decoder.", CODE_DIM, 1, grid, 1, gen)}
    for name, out in (("encode_task_layer", CODE_DIM), ("decode_task_layer", 512)):
        state.update({f"{name}.0.weight": torch.randn(WIDTH, WIDTH, generator=gen) * 0.1,
                      f"{name}.0.bias": torch.randn(WIDTH, generator=gen) * 0.1,
                      f"{name}.2.weight": torch.randn(out, WIDTH, generator=gen) * 0.1,
                      f"{name}.2.bias": torch.randn(out, generator=gen) * 0.1})
    codes = F.normalize(torch.randn(CODES, CODE_DIM, generator=gen), dim=-1)
    state.update({"quantize.embedding.weight": codes, "quantize.embedding.cluster_size": torch.rand(CODES, generator=gen),
                  "quantize.embedding.embed_avg": codes.clone(), "quantize.embedding.initted": torch.tensor([1.0]),
                  "quantize.cluster_size": torch.rand(CODES, generator=gen),
                  "scaling_layer.shift": torch.zeros(1, 3, 1, 1), "teacher_model.visual.proj": torch.zeros(4, 4)})
    return state


def write_released(path, seed: int = 0):
    torch.save({"model": released_layout(seed)}, path)  # as their training saves it: utils.save_model's {'model': ...}
    return path


def reference_ids(state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """The ids their `get_codebook_indices` computes, re-derived from the layout with tensor ops."""
    x = images * 255.0 / 127.5 - 1.0
    x = F.conv2d(x, state["encoder.patch_embed.proj.weight"], state["encoder.patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    b, n, d = x.shape
    pos = state["encoder.pos_embed"]
    if pos.shape[1] != n + 1:  # their interpolate_pos_encoding
        own, new = int((pos.shape[1] - 1) ** 0.5), int(n ** 0.5)
        patch_pos = F.interpolate(pos[:, 1:].reshape(1, own, own, d).permute(0, 3, 1, 2),
                                  scale_factor=((new + 0.1) / own, (new + 0.1) / own), mode="bicubic")
        pos = torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)
    x = torch.cat([state["encoder.cls_token"].expand(b, -1, -1), x], dim=1) + pos
    heads = d // 64
    for i in range(DEPTH):
        p = f"encoder.blocks.{i}."
        h = F.layer_norm(x, (d,), state[p + "norm1.weight"], state[p + "norm1.bias"], 1e-6)
        bias = torch.cat([state[p + "attn.q_bias"], torch.zeros(d), state[p + "attn.v_bias"]])
        q, k, v = F.linear(h, state[p + "attn.qkv.weight"], bias).reshape(b, n + 1, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, n + 1, d), state[p + "attn.proj.weight"],
                         state[p + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), state[p + "norm2.weight"], state[p + "norm2.bias"], 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                         state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    t = F.layer_norm(x[:, 1:], (d,), state["encoder.fc_norm.weight"], state["encoder.fc_norm.bias"], 1e-6)
    z = F.linear(torch.tanh(F.linear(t, state["encode_task_layer.0.weight"], state["encode_task_layer.0.bias"])),
                 state["encode_task_layer.2.weight"], state["encode_task_layer.2.bias"])
    z = F.normalize(z, p=2, dim=-1).reshape(-1, CODE_DIM)
    e = state["quantize.embedding.weight"]
    dist = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
    return dist.argmin(1).reshape(b, n)


@pytest.mark.parametrize("size", [IMAGE, 48])  # the trained grid, and another (their bicubic position resize)
def test_released_layout_gives_the_recomputed_ids_exactly(tmp_path, size):
    path = write_released(tmp_path / "vqkd_encoder_base_decoder_1x768x12_clip-test.pth")
    tokenizer = create_visual_tokenizer("vqkd", path, size, expected_grid=size // PATCH)
    images = torch.rand(6, 3, size, size, generator=torch.Generator().manual_seed(1))
    ids = tokenizer.get_codebook_indices(images)
    assert ids.shape == (6, (size // PATCH) ** 2) and tokenizer.vocab_size == CODES
    assert torch.equal(ids, reference_ids(released_layout(), images))
    assert len(ids.unique()) > 5  # not one code for everything
    assert tokenizer.info["left_out"] == ["decode_task_layer", "decoder"]


def test_a_crafted_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "vqkd.pth"
    path.write_bytes(pickle.dumps({"model": Payload()}, protocol=2))
    with pytest.raises(UserError, match="needs to run pickled code to load .it references io.open., and this project never"):
        load_vqkd_tokenizer(path)
    assert not marker.exists()


def test_wrong_files_and_grids_are_one_sentence(tmp_path):
    state = released_layout()
    del state["quantize.embedding.weight"]
    torch.save({"model": state}, tmp_path / "cut.pth")
    with pytest.raises(UserError, match="lacks quantize.embedding.weight"):
        load_vqkd_tokenizer(tmp_path / "cut.pth")
    state = {**released_layout(), "encoder.blocks.0.gamma_1": torch.ones(WIDTH)}  # layer scale: not VQ-KD's layout
    torch.save({"model": state}, tmp_path / "scaled.pth")
    with pytest.raises(UserError, match="encoder tensors a VQ-KD encoder of its shape does not have"):
        load_vqkd_tokenizer(tmp_path / "scaled.pth")
    with pytest.raises(UserError, match="does not exist"):
        load_vqkd_tokenizer(tmp_path / "missing.pth")
    path = write_released(tmp_path / "ok.pth")
    with pytest.raises(UserError, match=r"use --second_image_size 64"):
        create_visual_tokenizer("vqkd", path, IMAGE, expected_grid=8)


def test_an_image_mim_stage_trains_on_vqkd_targets(tmp_path, capsys):
    from main_pretrain_cook import main
    from models.checkpoints import read_model_checkpoint

    path = write_released(tmp_path / "vqkd.pth")
    out = tmp_path / "mim"
    main(["--exp_name", "image_mim", "--data_path", "synthetic", "--synthetic_train_size", "32", "--synthetic_val_size",
          "16", "--synthetic_render_size", "32", "--model", "vlmo_tiny_patch16", "--image_size", "32", "--patch_size", "8",
          "--second_image_size", "32", "--d_vae_type", "vqkd", "--d_vae_weight_path", str(path), "--batch_size", "8",
          "--epochs", "1", "--num_workers", "0", "--min_mask_patches_per_block", "4", "--no_pictures", "--device", "cpu",
          "--output_dir", str(out)])
    model = read_model_checkpoint(str(out / "checkpoint-0.pth")).model
    assert model["mim_head.proj.weight"].shape[0] == CODES  # the codebook's vocabulary
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert "test_acc_mim" in log[-1] and (out / "args.yaml").read_text().count("d_vae_type: vqkd") == 1
    with pytest.raises(SystemExit):
        main(["--exp_name", "image_mim", "--data_path", "synthetic", "--model", "vlmo_tiny_patch16", "--image_size", "32",
              "--patch_size", "8", "--second_image_size", "32", "--d_vae_type", "vqkd", "--d_vae_weight_path", str(path),
              "--visual_vocab_size", "32", "--device", "cpu", "--output_dir", str(tmp_path / "x")])
    assert "--img_vocab_size 32 but the VQ-KD codebook has 64 tokens" in capsys.readouterr().err
