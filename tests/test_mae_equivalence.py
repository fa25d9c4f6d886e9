"""MAE's released weights, written the way each library writes them (random weights), read here
and run on the same images with the same mask: the encoder's features, the decoder's
reconstruction and the loss equal facebookresearch/mae's code (as written, on timm's blocks),
Hugging Face's ViTMAEForPreTraining (files in transformers 4's and 5's names) and timm's ViT, to 1e-4."""
from __future__ import annotations

import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file

from models import create_model
from models.checkpoints import read_model_checkpoint
from models.head_loading import load_head
from models.mae_decoder import masked_mse, pixel_targets, sincos_2d
from models.modes.image_mae import visible_patches
from tests.helpers import max_diff, randomize_
from tests.mae_reference import MaskedAutoencoderViT, reference_sincos, save_released

TOL = 1e-4
SIZES = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, decoder_embed_dim=64, decoder_depth=2,
             decoder_num_heads=2)


def mae_reference(**kwargs) -> MaskedAutoencoderViT:
    """Random weights, but the decoder's positions stay MAE's fixed sine-cosine table (neither MAE
    nor Hugging Face ever trains it, and the decoder here makes it from the grid)."""
    torch.manual_seed(0)
    ref = randomize_(MaskedAutoencoderViT(**SIZES, **kwargs), scale=0.1).eval()
    ref.decoder_pos_embed.data.copy_(reference_sincos(SIZES["decoder_embed_dim"], 4))
    return ref


def ours(path):
    """The backbone and the MAE decoder a file holds, as every loader here reads it."""
    ckpt = read_model_checkpoint(path)
    backbone = create_model(None, pretrained=str(path), checkpoint=ckpt).eval()
    return backbone, load_head(ckpt, "mae_decoder", backbone.cfg)


def test_the_fixed_positions_are_maes():
    for dim, grid in ((64, 4), (512, 14), (96, 7)):
        assert max_diff(sincos_2d(dim, (grid, grid)), reference_sincos(dim, grid)) < 1e-6


@pytest.mark.parametrize("norm_pix", [False, True])
def test_maes_visualize_file_gives_its_features_reconstruction_and_loss(tmp_path, norm_pix):
    torch.manual_seed(0)
    ref = mae_reference(norm_pix_loss=norm_pix)
    path = tmp_path / "mae_visualize_vit_test.pth"
    save_released(ref, path, encoder_only=False)
    backbone, decoder = ours(path)
    assert decoder is not None and not backbone.cfg.use_rel_pos_bias and backbone.cfg.use_abs_pos_emb
    decoder.norm_pix_loss = norm_pix  # MAE's files do not say; the run's flag does
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.manual_seed(5)
        loss, pred, mask = ref(images, mask_ratio=0.75)
        torch.manual_seed(5)  # the same noise, so the same masking
        latent_ref, _, ids_restore = ref.forward_encoder(images, 0.75)
        visible = visible_patches(mask.bool())
        latent = backbone.encode_visible(images, visible)
        kept_order = torch.argsort(ids_restore, dim=1)[:, :visible.shape[1]]  # their ids_keep, shuffled
        reordered = torch.gather(latent_ref[:, 1:], 1, torch.argsort(kept_order, 1)[..., None].expand(-1, -1, 128))
        assert max_diff(latent[:, 1:], reordered) <= TOL and max_diff(latent[:, 0], latent_ref[:, 0]) <= TOL
        prediction = decoder(latent, visible)
        assert max_diff(prediction, pred) <= TOL
        ours_loss = masked_mse(prediction, pixel_targets(images, 8, norm_pix), mask.bool())
        assert abs(ours_loss.item() - loss.item()) <= TOL


def test_maes_pretrain_file_is_the_encoder_alone(tmp_path, capsys):
    torch.manual_seed(0)
    ref = mae_reference()
    save_released(ref, tmp_path / "mae_pretrain_vit_test.pth", encoder_only=True)
    backbone, decoder = ours(tmp_path / "mae_pretrain_vit_test.pth")
    assert decoder is None
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = backbone.encode_image(images)  # every patch visible: their forward_encoder at ratio 0
        expected, _, ids_restore = ref.forward_encoder(images, 0.0)  # all patches, in a shuffled order
        assert max_diff(full[:, 1:], torch.gather(expected[:, 1:], 1, ids_restore[..., None].expand(-1, -1, 128))) <= TOL
        assert max_diff(full[:, 0], expected[:, 0]) <= TOL


def test_timm_mae_weights_give_timms_features(tmp_path):
    """timm's vit_*_patch16_224.mae: a VisionTransformer state dict (model.safetensors on the hub)."""
    ref = randomize_(timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                       embed_dim=128, depth=2, num_heads=2, num_classes=0, global_pool=""),
                     scale=0.1).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "model.safetensors"))
    backbone, decoder = ours(tmp_path / "model.safetensors")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 4, 5, 9, 15, 2]] = mask[1, [0, 3, 7, 8, 12, 13]] = True
    with torch.no_grad():
        assert max_diff(backbone.encode_image(images), ref.forward_features(images)) <= TOL
        visible = visible_patches(mask)  # timm's own modules over the visible patches alone
        x = ref.patch_embed(images) + ref.pos_embed[:, 1:]
        x = torch.gather(x, 1, visible[..., None].expand(-1, -1, 128))
        x = torch.cat([(ref.cls_token + ref.pos_embed[:, :1]).expand(2, -1, -1), x], 1)
        for block in ref.blocks:
            x = block(x)
        assert max_diff(backbone.encode_visible(images, visible), ref.norm(x)) <= TOL


def _hf_model(norm_pix: bool) -> transformers.ViTMAEForPreTraining:
    config = transformers.ViTMAEConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=512, image_size=32, patch_size=8, decoder_hidden_size=64,
                                       decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                                       decoder_intermediate_size=256, norm_pix_loss=norm_pix, mask_ratio=0.75)
    torch.manual_seed(0)
    model = randomize_(transformers.ViTMAEForPreTraining(config), scale=0.1).eval()
    model.decoder.decoder_pos_embed.data.copy_(reference_sincos(64, 4))  # fixed in every ViTMAE
    return model


def as_transformers_4(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's names -> 4's, what the hub's facebook/vit-mae-* files hold."""
    import re

    out = {}
    for key, value in state.items():
        key = key.replace("vit.layers.", "vit.encoder.layer.")
        key = re.sub(r"\.attention\.([qkv])_proj\.",
                     lambda m: f".attention.attention.{dict(q='query', k='key', v='value')[m.group(1)]}.", key)
        key = key.replace(".attention.o_proj.", ".attention.output.dense.")
        key = key.replace(".mlp.fc1.", ".intermediate.dense.").replace(".mlp.fc2.", ".output.dense.")
        out[key] = value
    return out


@pytest.mark.parametrize("names", ["saved by transformers 5", "transformers 4", "transformers 5 modules"])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_hugging_face_vitmae_folders_give_its_outputs(tmp_path, names, norm_pix):
    ref = _hf_model(norm_pix)
    folder = tmp_path / "vit-mae"
    ref.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if names != "saved by transformers 5":  # rewritten; transformers 5 itself reads them back the same
        written = as_transformers_4(state) if names == "transformers 4" else state
        save_file(written, str(folder / "model.safetensors"), metadata={"format": "pt"})
        again = transformers.ViTMAEForPreTraining.from_pretrained(folder)
        assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    backbone, decoder = ours(folder)
    assert backbone.cfg.layer_norm_eps == 1e-12 and decoder.norm_pix_loss == norm_pix and decoder.mask_ratio == 0.75
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = ref(pixel_values=images, noise=noise)
        hidden = ref.vit(pixel_values=images, noise=noise).last_hidden_state  # visible tokens, shuffled
        mask = out.mask.bool()
        visible = visible_patches(mask)
        latent = backbone.encode_visible(images, visible)
        keep = torch.argsort(noise, 1)[:, :visible.shape[1]]
        reordered = torch.gather(hidden[:, 1:], 1, torch.argsort(keep, 1)[..., None].expand(-1, -1, 128))
        assert max_diff(latent[:, 1:], reordered) <= TOL and max_diff(latent[:, 0], hidden[:, 0]) <= TOL
        prediction = decoder(latent, visible)
        assert max_diff(prediction, out.logits) <= TOL
        loss = masked_mse(prediction, pixel_targets(images, 8, norm_pix), mask)
        assert abs(loss.item() - out.loss.item()) <= TOL


def test_convert_writes_an_mae_file_that_loads_the_same(tmp_path, capsys):
    from util.convert_beit_ckpt import main as convert

    torch.manual_seed(0)
    ref = mae_reference()
    save_released(ref, tmp_path / "mae_visualize_vit_test.pth", encoder_only=False)
    convert(["--input", str(tmp_path / "mae_visualize_vit_test.pth"), "--output", str(tmp_path / "ours.safetensors")])
    said = capsys.readouterr().out
    assert "(MAE, " in said and "key biases left out" in said
    direct, converted = ours(tmp_path / "mae_visualize_vit_test.pth"), ours(tmp_path / "ours.safetensors")
    images = torch.randn(2, 3, 32, 32)
    visible = torch.tensor([[0, 5, 9, 14], [1, 2, 3, 4]])
    with torch.no_grad():
        a, b = direct[0].encode_visible(images, visible), converted[0].encode_visible(images, visible)
        assert torch.equal(a, b) and torch.equal(direct[1](a, visible), converted[1](b, visible))
    with pytest.raises(SystemExit):
        convert(["--input", str(tmp_path / "mae_visualize_vit_test.pth"), "--output", str(tmp_path / "x.safetensors"),
                 "--image_size", "64"])
    assert "--image_size shape a BEiT conversion" in capsys.readouterr().err
