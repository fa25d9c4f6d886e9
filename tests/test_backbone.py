"""Properties of the shared backbone: every variant trains, padding is inert, experts route
correctly, position tables interpolate faithfully, checkpoints round-trip."""
from __future__ import annotations

import pytest
import torch

from common.checkpoint_io import save_weights
from common.errors import UserError
from models import BACKBONE_VARIANTS, create_model, list_models
from models import relative_position as rp
from models.config import BackboneConfig
from models.pretrained import BACKBONE_PREFIX
from tests.helpers import max_diff, randomize_


def _tiny(ffn="shared", **kw):
    values = dict(img_size=32, patch_size=8, ffn=ffn, max_text_len=16, vocab_size=100)
    values.update(kw)
    return create_model("vlmo_tiny_patch16", **values)


def _batch(model, batch=2, length=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=gen)
    ids = torch.randint(1, cfg.vocab_size, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    return images, ids, mask


def _all_paths_loss(model, seed=0):
    images, ids, mask = _batch(model, seed=seed)
    masked = torch.rand(images.shape[0], model.cfg.num_patches, generator=torch.Generator().manual_seed(seed)) < 0.5
    return (model.encode_image(images, masked).pow(2).mean() + model.encode_text(ids, mask).pow(2).mean()
            + model.encode_pair(images, ids, mask).pow(2).mean())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("ffn", ["shared", "multiway"])
def test_every_variant_trains_every_parameter(name, ffn):
    depth = BackboneConfig(**BACKBONE_VARIANTS[name]).depth
    model = create_model(name, img_size=32, patch_size=16, ffn=ffn, max_text_len=16, vocab_size=64,
                         vlffn_start_layer_index=depth - 1, drop_path_rate=0.1)
    randomize_(model, scale=0.01)  # zero-initialised tables and biases must still get gradients
    model.train()
    torch.manual_seed(0)  # drop path is random: with few samples a branch can drop for all of them
    _all_paths_loss(model).backward()
    without = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not without, f"parameters without gradient: {without[:5]}"


def test_grad_checkpointing_matches_plain_backward():
    model = randomize_(_tiny(), scale=0.05).train()
    _all_paths_loss(model).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    _all_paths_loss(model).backward()
    for n, p in model.named_parameters():
        assert max_diff(p.grad, plain[n]) < 1e-5, n


@pytest.mark.parametrize("ffn", ["shared", "multiway"])
def test_padding_does_not_change_real_tokens(ffn):
    model = randomize_(_tiny(ffn), scale=0.05).eval()
    images, ids, _ = _batch(model, batch=1, length=5)
    padded = torch.cat([ids, torch.randint(1, 100, (1, 4))], 1)  # 4 junk padding tokens
    mask = torch.tensor([[1] * 5 + [0] * 4])
    with torch.no_grad():
        assert max_diff(model.encode_text(padded, mask)[:, :5], model.encode_text(ids)) < 1e-5
        short = model.encode_pair(images, ids)
        long = model.encode_pair(images, padded, mask)
        assert max_diff(long[:, :5], short[:, :5]) < 1e-5
        assert max_diff(long[:, 9:], short[:, 5:]) < 1e-5  # image tokens after the text


def test_multiway_routes_each_modality_to_its_expert():
    model = randomize_(_tiny("multiway", vlffn_start_layer_index=2), scale=0.05).eval()
    images, ids, mask = _batch(model)
    with torch.no_grad():
        before = (model.encode_image(images), model.encode_text(ids, mask), model.encode_pair(images, ids, mask))
        for block in model.blocks:
            block.mlp_imag.fc2.weight.add_(1.0)
        after = (model.encode_image(images), model.encode_text(ids, mask), model.encode_pair(images, ids, mask))
    assert max_diff(before[0], after[0]) > 1e-3  # images use the image expert
    assert max_diff(before[1], after[1]) == 0  # text never does
    assert max_diff(before[2], after[2]) > 1e-3  # pairs do in early layers


def test_masked_patches_become_the_mask_token():
    model = randomize_(_tiny(), scale=0.05).eval()
    images, _, _ = _batch(model, batch=1)
    masked = torch.zeros(1, model.cfg.num_patches, dtype=torch.bool)
    masked[0, 3] = True
    other = images.clone()
    other[..., 0:8, 24:32] = torch.randn(1, 3, 8, 8)  # patch 3 of the 4x4 grid
    with torch.no_grad():
        assert max_diff(model.encode_image(images, masked), model.encode_image(other, masked)) == 0
        assert max_diff(model.encode_image(images), model.encode_image(other)) > 1e-3


def test_image_index_matches_beit_definition():
    grid = (3, 4)
    index = rp.image_index(grid)
    size = rp.num_image_entries(grid)
    coords = [(i, j) for i in range(3) for j in range(4)]
    for a, (ia, ja) in enumerate(coords):
        for b, (ib, jb) in enumerate(coords):
            assert index[a + 1, b + 1] == (ia - ib + 2) * 7 + (ja - jb + 3)
    assert index[0, 0] == size - 1 and index[0, 5] == size - 3 and index[5, 0] == size - 2
    text = rp.text_index(grid, 6)
    assert text.min() >= size + 2 and text.max() == rp.num_table_entries(grid, 6) - 1


def test_interpolation_is_identity_at_the_same_size():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(rp.num_table_entries((7, 7), 10), 12, generator=gen)
    assert max_diff(rp.resize_table(table, (7, 7), (7, 7), 10, 10), table) < 1e-6
    pos = torch.randn(1, 50, 16, generator=gen)
    assert max_diff(rp.resize_abs_pos_embed(pos, (7, 7), (7, 7)), pos) < 1e-6


def test_interpolation_preserves_smooth_tables_and_text_rows():
    # the offset grid is stretched: constants stay exact, a plane stays a plane up to the
    # overshoot of PyTorch's bicubic kernel (a=-0.75), and the [CLS] rows are untouched
    old, new = (4, 4), (6, 6)
    constant = torch.full((rp.num_image_entries(old), 2), 0.3)
    assert max_diff(rp.resize_image_table(constant, old, new), torch.full((rp.num_image_entries(new), 2), 0.3)) < 1e-6
    dy, dx = torch.meshgrid(torch.arange(-3, 4.0), torch.arange(-3, 4.0), indexing="ij")
    window = (0.5 * dy + 0.25 * dx).reshape(-1, 1)
    rows = torch.cat([window, torch.tensor([[7.0], [8.0], [9.0]])])
    resized = rp.resize_image_table(rows, old, new)
    ny, nx = torch.meshgrid(torch.linspace(-3, 3, 11), torch.linspace(-3, 3, 11), indexing="ij")
    assert max_diff(resized[:-3], (0.5 * ny + 0.25 * nx).reshape(-1, 1)) < 0.05 * 4.5
    assert resized[-3:].flatten().tolist() == [7.0, 8.0, 9.0]
    # shrinking text capacity keeps the central offsets and the [CLS] rows
    table = torch.arange(rp.num_table_entries(old, 8), dtype=torch.float).unsqueeze(1)
    small = rp.resize_table(table, old, old, 8, 5)
    r = rp.num_image_entries(old)
    assert small.shape[0] == rp.num_table_entries(old, 5)
    assert small[r + 2:r + 2 + 7].flatten().tolist() == table[r + 2 + 3:r + 2 + 10].flatten().tolist()
    assert small[-3:].flatten().tolist() == table[-3:].flatten().tolist()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_round_trip_and_resolution_change(tmp_path, suffix):
    model = randomize_(_tiny(), scale=0.05).eval()
    path = tmp_path / f"tiny{suffix}"
    save_weights(path, {BACKBONE_PREFIX + k: v for k, v in model.state_dict().items()}, model.cfg.to_dict())
    images, ids, mask = _batch(model)
    again = create_model(None, pretrained=str(path)).eval()
    by_name = create_model("vlmo_tiny_patch16", pretrained=str(path)).eval()
    with torch.no_grad():
        for other in (again, by_name):
            assert max_diff(other.encode_image(images), model.encode_image(images)) == 0
            assert max_diff(other.encode_pair(images, ids, mask), model.encode_pair(images, ids, mask)) == 0
    bigger = create_model(None, pretrained=str(path), img_size=48).eval()
    assert bigger.encode_image(torch.randn(1, 3, 48, 48)).shape == (1, 37, 192)
    assert torch.load(path, weights_only=True) if suffix == ".pth" else True


def test_checkpoint_of_another_size_is_refused(tmp_path):
    model = _tiny()
    path = tmp_path / "tiny.safetensors"
    save_weights(path, {BACKBONE_PREFIX + k: v for k, v in model.state_dict().items()}, model.cfg.to_dict())
    with pytest.raises(UserError, match=r"another size: embed_dim=192 \(vlmo_base_patch16 has 768\).*vlmo_tiny_patch16"):
        create_model("vlmo_base_patch16", pretrained=str(path))
    with pytest.raises(UserError, match="patch_size"):
        create_model(None, pretrained=str(path), patch_size=16)
