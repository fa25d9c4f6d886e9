"""Converted BEiT weights reproduce the reference implementations (HF transformers, timm)."""
from __future__ import annotations

import pytest
import timm  # noqa: E402
import torch
import transformers  # noqa: E402 - references are required, never skipped

from common.checkpoint_io import read_checkpoint
from models import MIMHead, create_model
from models.head_loading import load_head_into as load_head_weights
from tests.helpers import max_diff, randomize_
from util.convert_beit_ckpt import main as convert_main

TOL = 1e-4
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=32, patch_size=8)
BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224, patch_size=16)


def _hf_config(dims: dict, **kw):
    return transformers.BeitConfig(**dims, layer_norm_eps=1e-6, layer_scale_init_value=0.1, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, drop_path_rate=0.0, **kw)


def _convert(tmp_path, source, name="converted.safetensors", *extra):
    out = tmp_path / name
    convert_main(["--input", str(source), "--output", str(out), *extra])
    return out


def _inputs(size: int, patch: int, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen)
    mask = torch.rand(batch, (size // patch) ** 2, generator=gen) < 0.4
    return images, mask


def _check_hf_mim(tmp_path, dims, model_name=None, scale=0.2):
    ref = randomize_(transformers.BeitForMaskedImageModeling(
        _hf_config(dims, use_shared_relative_position_bias=True, use_mask_token=True)), scale=scale).eval()
    ref.save_pretrained(tmp_path / "hf_mim")
    ckpt_path = _convert(tmp_path, tmp_path / "hf_mim")
    ours = create_model(model_name, pretrained=str(ckpt_path)).eval()
    head = MIMHead(dims["hidden_size"])
    assert load_head_weights(head, read_checkpoint(ckpt_path), "mim_head")
    images, mask = _inputs(dims["image_size"], dims["patch_size"])
    with torch.no_grad():
        for bool_masked_pos in (None, mask):
            hidden = ref.beit(pixel_values=images, bool_masked_pos=bool_masked_pos).last_hidden_state
            expected = ref.layernorm(hidden)
            got = ours.encode_image(images, bool_masked_pos)
            assert max_diff(got, expected) <= TOL
        expected_logits = ref(pixel_values=images, bool_masked_pos=mask).logits  # [B, N, 8192]
        got_logits = head(ours.encode_image(images, mask)[:, 1:])
        assert max_diff(got_logits, expected_logits) <= TOL
        # the same visual tokens are predicted
        assert torch.equal(got_logits.argmax(-1), expected_logits.argmax(-1))


def test_hf_mim_shared_table_tiny(tmp_path):
    _check_hf_mim(tmp_path, TINY)


def test_hf_beit_model_per_block_tables_both_key_namings(tmp_path):
    ref = randomize_(transformers.BeitModel(
        _hf_config(TINY, use_relative_position_bias=True, use_mask_token=True, use_mean_pooling=False),
        add_pooling_layer=False)).eval()
    ref.save_pretrained(tmp_path / "hf_model")  # 4.x key names on disk
    torch.save(ref.state_dict(), tmp_path / "hf_v5_names.pth")  # 5.x in-memory key names
    images, mask = _inputs(32, 8, seed=1)
    for source in (tmp_path / "hf_model", tmp_path / "hf_v5_names.pth"):
        ours = create_model(None, pretrained=str(_convert(tmp_path, source, f"{source.stem}.safetensors"))).eval()
        with torch.no_grad():
            for bool_masked_pos in (None, mask):
                expected = ref(pixel_values=images, bool_masked_pos=bool_masked_pos).last_hidden_state
                assert max_diff(ours.encode_image(images, bool_masked_pos), expected) <= TOL


def _timm_beit(**kw):
    return timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                             depth=2, num_heads=4, num_classes=5, **kw)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_finetuned_per_block_with_fc_norm(tmp_path, suffix):
    ref = randomize_(_timm_beit()).eval()  # global_pool="avg": no final norm, fc_norm + head
    source = tmp_path / f"timm{suffix}"
    if suffix == ".pth":
        torch.save(ref.state_dict(), source)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(source))
    ckpt_path = _convert(tmp_path, source)
    ours = create_model(None, pretrained=str(ckpt_path)).eval()
    assert not ours.cfg.final_norm
    ckpt = read_checkpoint(ckpt_path)
    pooler, classifier = torch.nn.LayerNorm(64, eps=1e-6), torch.nn.Linear(64, 5)
    assert load_head_weights(pooler, ckpt, "pooler_norm") and load_head_weights(classifier, ckpt, "classifier")
    images, _ = _inputs(32, 8, seed=2)
    with torch.no_grad():
        tokens = ours.encode_image(images)
        assert max_diff(tokens, ref.forward_features(images)) <= TOL
        logits = classifier(pooler(tokens[:, 1:].mean(1)))
        assert max_diff(logits, ref(images)) <= TOL


def test_unilm_pt22k_format_shared_table(tmp_path):
    """unilm's self-supervised checkpoints: {'model': sd} with one shared table, mask_token and lm_head."""
    ref = randomize_(_timm_beit(use_shared_rel_pos_bias=True, use_rel_pos_bias=False, global_pool="token")).eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("head.")}
    lm_head = randomize_(torch.nn.Linear(64, 8192), seed=3)
    state.update({"mask_token": torch.randn(1, 1, 64), "lm_head.weight": lm_head.weight.detach(),
                  "lm_head.bias": lm_head.bias.detach(),
                  "rel_pos_bias.relative_position_index": torch.zeros(17, 17, dtype=torch.long)})
    torch.save({"model": state}, tmp_path / "beit_pt22k.pth")
    ckpt_path = _convert(tmp_path, tmp_path / "beit_pt22k.pth", "pt.pth")
    ours = create_model(None, pretrained=str(ckpt_path)).eval()
    head = MIMHead(64)
    assert load_head_weights(head, read_checkpoint(ckpt_path), "mim_head")
    images, _ = _inputs(32, 8, seed=4)
    with torch.no_grad():
        features = ours.encode_image(images)
        expected = ref.forward_features(images)
        assert max_diff(features, expected) <= TOL
        assert max_diff(head(features[:, 1:]), lm_head(expected[:, 1:])) <= TOL


def test_base_config_hf_mim(tmp_path):
    """The real BEiT-base shape (768/12/12, 224 px) into the registered vlmo_base_patch16."""
    # weights at the scale of trained BEiT weights (std ~0.02): large random ones blow up the residual stream
    _check_hf_mim(tmp_path, BASE, model_name="vlmo_base_patch16", scale=0.02)


def test_base_config_timm(tmp_path):
    ref = randomize_(timm.create_model("beit_base_patch16_224", pretrained=False), scale=0.02).eval()
    torch.save(ref.state_dict(), tmp_path / "timm_base.pth")
    ours = create_model("vlmo_base_patch16", pretrained=str(
        _convert(tmp_path, tmp_path / "timm_base.pth", "b.safetensors", "--model", "vlmo_base_patch16"))).eval()
    images, _ = _inputs(224, 16, batch=1, seed=5)
    with torch.no_grad():
        assert max_diff(ours.encode_image(images), ref.forward_features(images)) <= TOL


def test_multiway_conversion_places_the_vision_language_expert_where_asked(tmp_path, capsys):
    ref = randomize_(transformers.BeitForMaskedImageModeling(
        _hf_config(TINY, use_shared_relative_position_bias=True, use_mask_token=True)), scale=0.2).eval()
    ref.save_pretrained(tmp_path / "hf_mim")
    out = _convert(tmp_path, tmp_path / "hf_mim", "multiway.safetensors", "--ffn", "multiway",
                   "--vlffn_start_layer_index", "1")
    ckpt = read_checkpoint(out)
    assert ckpt.backbone_config["vlffn_start_layer_index"] == 1
    for layer in (0, 1):  # every expert starts as BEiT's FFN; the vision-language one only from block 1
        source = ref.state_dict()[f"beit.layers.{layer}.mlp.fc1.weight"]
        experts = ("imag", "text", "vl") if layer else ("imag", "text")
        for expert in experts:
            assert torch.equal(ckpt.model[f"backbone.blocks.{layer}.mlp_{expert}.fc1.weight"], source)
        assert (f"backbone.blocks.{layer}.mlp_vl.fc1.weight" in ckpt.model) == (layer >= 1)
    refusals = {"--vlffn_start_layer_index 3 is not a block of this 2-block model": ["--ffn", "multiway",
                                                                                     "--vlffn_start_layer_index", "3"],
                "add --ffn multiway": ["--vlffn_start_layer_index", "1"]}
    for message, flags in refusals.items():
        with pytest.raises(SystemExit):
            _convert(tmp_path, tmp_path / "hf_mim", "refused.safetensors", *flags)
        assert message in capsys.readouterr().err and not (tmp_path / "refused.safetensors").exists()


def test_a_model_built_from_scratch_takes_the_vision_language_expert_start(tmp_path):
    from common.errors import UserError
    from training.cli import pretrain_config_from_argv
    from training.weights import Weights, build_backbone

    argv = ["--exp_name", "image_text_itm", "--data_path", "synthetic", "--output_dir", str(tmp_path / "o")]
    cfg = pretrain_config_from_argv(argv + ["--ffn", "multiway", "--vlffn_start_layer_index", "2"])
    backbone = build_backbone(cfg, Weights(), 100)
    assert backbone.cfg.vlffn_start_layer_index == 2
    assert [hasattr(block, "mlp_vl") for block in backbone.blocks] == [False, False, True, True]
    with pytest.raises(UserError, match="add --ffn multiway"):
        pretrain_config_from_argv(argv + ["--vlffn_start_layer_index", "2"])
    with pytest.raises(UserError, match="is not a block of this 4-block model"):
        build_backbone(pretrain_config_from_argv(argv + ["--ffn", "multiway", "--vlffn_start_layer_index", "5"]),
                       Weights(), 100)


def test_a_shared_table_and_per_block_tables_are_added_as_beit_does(tmp_path, capsys):
    """BEiT with use_shared_rel_pos_bias and use_rel_pos_bias adds both biases in every block; the
    per-block tables were dropped (the shared one kept) without a word."""
    ref = randomize_(_timm_beit(use_shared_rel_pos_bias=True, use_rel_pos_bias=True, global_pool="token")).eval()
    torch.save(ref.state_dict(), tmp_path / "both.pth")
    ours = create_model(None, pretrained=str(_convert(tmp_path, tmp_path / "both.pth"))).eval()
    assert "each block's relative position table added to the shared one" in capsys.readouterr().out
    images, _ = _inputs(32, 8, seed=5)
    with torch.no_grad():
        assert max_diff(ours.encode_image(images), ref.forward_features(images)) <= TOL
