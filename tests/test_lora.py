"""LoRA on the backbone: where adapters go, zero-init and merge equivalence, which parameters
train, the self-regularization value and gradient against the formula, and stage handover."""
from __future__ import annotations

import pytest
import torch

from common.checkpoint_io import read_checkpoint, save_weights
from common.errors import UserError
from models import create_model
from models.lora import (
    TARGET_MODULES,
    add_lora,
    delta_weight,
    load_plain_state,
    lora_layers,
    merge_adapters,
    plain_names,
    self_regularization,
)
from models.lora_checkpoints import fold_adapters, save_merged_model
from models.modes import ModeOptions, TextMLM
from models.trainability import configure_trainable
from tests.helpers import max_diff, randomize_


def _backbone(ffn: str = "shared"):
    torch.manual_seed(0)
    return randomize_(create_model("vlmo_tiny_patch16", img_size=32, patch_size=8, ffn=ffn, drop_path_rate=0.0).eval())


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=gen), torch.randint(5, 100, (2, 9), generator=gen)


def _outputs(backbone):
    images, ids = _inputs()
    with torch.no_grad():  # same grad mode everywhere: CPU kernels differ by ~1e-7 between modes
        return backbone.encode_image(images), backbone.encode_text(ids), backbone.encode_pair(images, ids)


@pytest.mark.parametrize("ffn", ["shared", "multiway"])
def test_adapters_on_attention_and_ffn_only(ffn):
    backbone = add_lora(_backbone(ffn), 4, 8)
    names = [n for n, _ in lora_layers(backbone)]
    cfg = backbone.cfg
    ffns = 1 if ffn == "shared" else 2 + sum(i >= cfg.vlffn_start_layer_index for i in range(cfg.depth)) / cfg.depth
    assert len(names) == cfg.depth * 2 + round(cfg.depth * ffns) * 2  # qkv, proj + fc1, fc2 of every expert
    assert not any("patch_embed" in n for n in names)  # peft target "proj" alone would catch patch_embed.proj
    assert all(n.split(".")[-1] in ("qkv", "proj", "fc1", "fc2") for n in names)
    assert "patch_embed" not in TARGET_MODULES


def test_zero_init_equals_base_model_and_merge_equals_unmerged():
    backbone = _backbone("multiway")
    before = _outputs(backbone)
    add_lora(backbone, 4, 16)
    for a, b in zip(before, _outputs(backbone)):
        assert torch.equal(a, b)  # B starts at zero: the adapted model is exactly the base model
    randomize_(backbone, seed=3, scale=0.05)  # now every adapter has a non-zero update
    adapted = _outputs(backbone)
    merged_state = merge_adapters(plain_names(backbone.state_dict()), scaling=16 / 4)
    plain = _backbone("multiway")
    plain.load_state_dict(merged_state)
    for a, b in zip(adapted, _outputs(plain)):
        assert max_diff(a, b) < 1e-4
    # and peft's own merge agrees with ours
    from peft.tuners.lora import LoraLayer

    for module in backbone.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    for a, b in zip(adapted, _outputs(backbone)):
        assert max_diff(a, b) < 1e-4


def test_self_regularization_value_and_gradient_match_the_formula():
    backbone = add_lora(_backbone(), 4, 8)
    randomize_(backbone, seed=5, scale=0.05)
    value = self_regularization(backbone)
    expected = torch.zeros(())
    for _, layer in lora_layers(backbone):
        w = layer.base_layer.weight
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected = expected + ((w * (8 / 4) * (b @ a)) ** 2).sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    layer = lora_layers(backbone)[0][1]
    w, a, b = layer.base_layer.weight.detach(), layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    s = 2.0
    # d/dB sum((W ⊙ sBA)^2) = 2 s (W ⊙ W ⊙ sBA) A^T ; d/dA = 2 s B^T (W ⊙ W ⊙ sBA)
    inner = w * w * (s * b @ a)
    assert torch.allclose(layer.lora_B["default"].weight.grad, 2 * s * inner @ a.t(), rtol=1e-4, atol=1e-8)
    assert torch.allclose(layer.lora_A["default"].weight.grad, 2 * s * b.t() @ inner, rtol=1e-4, atol=1e-8)
    assert delta_weight(layer).shape == w.shape


def test_only_trainable_parameters_change_after_training_steps():
    task = TextMLM(_backbone(), ModeOptions())
    add_lora(task.backbone, 4, 8)
    counts = configure_trainable(task, lora=True, trainable_extra=["blocks.0.norm1.*"])
    assert set(counts) == {"LoRA adapters", "heads", "final norm", "text embeddings", "extra"}
    before = {k: v.clone() for k, v in task.state_dict().items()}
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2)
    task.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(5, 100, (4, 8), generator=gen)
        labels = torch.full_like(ids, -100)
        labels[:, 2] = ids[:, 2]
        out = task({"mlm_input_ids": ids, "attention_mask": torch.ones_like(ids), "mlm_labels": labels})
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, value in task.state_dict().items():
        changed = not torch.equal(value, before[name])
        assert changed == (name in trainable) or not changed, name
        if name not in trainable:
            assert not changed, f"frozen {name} moved"
    assert any("lora_B" in n and not torch.equal(task.state_dict()[n], before[n]) for n in trainable)
    with pytest.raises(UserError, match="matches no parameter"):
        configure_trainable(task, lora=True, trainable_extra=["no_such_param*"])


def test_new_lora_stage_on_a_merged_checkpoint_reproduces_it_and_double_merging_is_refused(tmp_path):
    backbone = add_lora(_backbone(), 4, 8)
    randomize_(backbone, seed=7, scale=0.05)
    expected = _outputs(backbone)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    merged_path = tmp_path / "merged.safetensors"
    save_merged_model(merged_path, state, backbone.cfg.to_dict(), {"rank": 4, "alpha": 8}, "test")
    assert not any(".lora_" in k for k in read_checkpoint(merged_path).model)
    merged_model = create_model(None, pretrained=str(merged_path)).eval()
    next_stage = create_model(None, pretrained=str(merged_path))
    add_lora(next_stage, 4, 8)  # fresh adapters on merged weights: the merged model's outputs exactly
    for a, b, c in zip(expected, _outputs(merged_model), _outputs(next_stage.eval())):
        assert torch.equal(b, c)
        assert max_diff(a, b) < 1e-4  # merging itself only reorders float arithmetic
    # a file marked merged that still carries adapters would count them twice
    bad = tmp_path / "bad.safetensors"
    save_weights(bad, plain_names(state), backbone.cfg.to_dict(), {"lora_merged": "true"})
    with pytest.raises(UserError, match="count the adapters twice"):
        fold_adapters(read_checkpoint(bad))
    with pytest.raises(UserError, match="count the adapters twice"):
        create_model(None, pretrained=str(bad))


def test_plain_named_state_round_trips_into_an_adapted_model():
    backbone = add_lora(_backbone(), 4, 8)
    randomize_(backbone, seed=9, scale=0.05)
    plain = plain_names(backbone.state_dict())
    assert not any(".base_layer." in k or ".default." in k for k in plain)
    other = add_lora(_backbone(), 4, 8)
    load_plain_state(other, plain)
    for a, b in zip(_outputs(backbone), _outputs(other)):
        assert torch.equal(a, b)
