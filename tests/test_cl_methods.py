"""The continual-learning methods' mechanisms, each against a value computed by hand, and the
--cl_method flags end to end on tiny stages."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from common.checkpoint_io import load_safetensors_file, read_checkpoint, save_safetensors
from common.errors import UserError
from main_pretrain_cook import main
from models import create_model
from models.lora import ADAPTER, add_lora, is_adapter_key, lora_layers, merge_adapters, plain_names
from training.continual.distill import FeatureDistillation
from training.continual.ewc import ElasticWeightConsolidation
from training.continual.fisher import FISHER_FILE
from training.continual.l2 import L2ToPrevious
from training.continual.wise import interpolate
from tests.test_pretrain_cli import SYNTH, TINY, TINY_BASE
from util.train_text_tokenizer import main as train_tokenizer


@pytest.fixture(scope="module")
def word_pieces(tmp_path_factory):
    return str(train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "200", "--output",
                                str(tmp_path_factory.mktemp("tok") / "tok")]))


def _lora_backbone(seed: int = 0):
    torch.manual_seed(seed)
    backbone = create_model("vlmo_tiny_patch16", img_size=32, patch_size=8, drop_path_rate=0.0, vocab_size=50)
    add_lora(backbone, 4, 8)
    for name, param in backbone.named_parameters():  # as a LoRA text stage trains: adapters and text embeddings
        param.requires_grad_(is_adapter_key(plain_names({name: param}).popitem()[0]) or name.startswith("text_embeddings."))
    return backbone


def _stand_in_run(backbone, init_from: str = "unused") -> SimpleNamespace:
    return SimpleNamespace(backbone=backbone, weights=SimpleNamespace(continue_run=False, ckpt=None),
                           ctx=SimpleNamespace(device=torch.device("cpu")),
                           cfg=SimpleNamespace(model=SimpleNamespace(init_from=init_from),
                                               continual=SimpleNamespace(cl_method="test", wise_alpha=0.5),
                                               lora=SimpleNamespace(lora_rank=4)))


def _base_weights(backbone):
    """A copy of the base weights by plain name (what the stage starts from), adapters left out."""
    return {k: v.clone() for k, v in plain_names(backbone.state_dict()).items() if not is_adapter_key(k)}


def _move(backbone, seed: int = 1):
    """A known step: every B to random values, the text embedding shifted by 0.1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(backbone):
            b = layer.lora_B[ADAPTER].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
        backbone.text_embeddings.word_embeddings.weight.add_(0.1)


def _deltas(backbone, before):
    """θ − θ_prev by hand: scaling · B · A of each adapted linear, and the moved embedding."""
    out = {}
    for name, layer in lora_layers(backbone):
        out[f"{name}.weight"] = layer.scaling[ADAPTER] * layer.lora_B[ADAPTER].weight @ layer.lora_A[ADAPTER].weight
    key = "text_embeddings.word_embeddings.weight"
    out[key] = backbone.text_embeddings.word_embeddings.weight - before[key]
    return out


def test_ewc_penalty_is_zero_at_the_start_and_the_fisher_weighted_sum_after_a_step(tmp_path):
    backbone = _lora_backbone()
    before = _base_weights(backbone)
    gen = torch.Generator().manual_seed(2)
    fisher = {k: torch.rand(v.shape, generator=gen) for k, v in before.items()}
    save_safetensors(tmp_path / FISHER_FILE, fisher)
    method = ElasticWeightConsolidation(None)
    method.start(_stand_in_run(backbone, str(tmp_path / "merged_model.safetensors")))
    assert method.penalty().item() == 0.0
    _move(backbone)
    expected = sum((fisher[k] * d.pow(2)).sum() for k, d in _deltas(backbone, before).items())
    assert method.penalty().item() == pytest.approx(expected.item(), rel=1e-5)


def test_ewc_without_the_sidecar_says_how_to_make_it(tmp_path):
    method = ElasticWeightConsolidation(None)
    with pytest.raises(UserError, match="--fisher_samples"):
        method.start(_stand_in_run(_lora_backbone(), str(tmp_path / "checkpoint-0.pth")))


def test_l2_penalty_is_the_squared_change_of_what_trains():
    backbone = _lora_backbone()
    before = _base_weights(backbone)
    method = L2ToPrevious(None)
    method.start(_stand_in_run(backbone))
    assert method.penalty().item() == 0.0
    _move(backbone)
    expected = sum(d.pow(2).sum() for d in _deltas(backbone, before).values())
    assert method.penalty().item() == pytest.approx(expected.item(), rel=1e-5)
    method.penalty().backward()  # the gradient reaches the adapters and the embedding, not the frozen bases
    assert backbone.text_embeddings.word_embeddings.weight.grad is not None
    assert all(layer.base_layer.weight.grad is None for _, layer in lora_layers(backbone))


def test_distillation_is_zero_at_the_start_and_trains_only_the_new_backbone():
    backbone = _lora_backbone()
    method = FeatureDistillation(None)
    method.start(_stand_in_run(backbone))
    batch = {"image": torch.randn(4, 3, 32, 32), "input_ids": torch.randint(0, 50, (4, 8)),
             "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    assert method.batch_penalty(batch).item() < 1e-6
    _move(backbone)
    loss = method.batch_penalty(batch)
    assert loss.item() > 1e-4
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())
    assert all(p.grad is None for p in method.teacher.parameters())


def _merged(backbone):
    merged = merge_adapters(plain_names(backbone.state_dict()), 2.0)  # alpha 8 / rank 4
    return {k: v.clone() for k, v in merged.items()}  # not views of the live weights


def _trained_from_anchor():
    """(an adapted backbone after a known step, its starting weights, its merged trained weights)."""
    backbone = _lora_backbone()
    anchor = _base_weights(backbone)
    _move(backbone)
    return backbone, anchor, _merged(backbone)


def test_wise_at_alpha_one_and_zero_gives_back_its_inputs_exactly():
    backbone, anchor, trained = _trained_from_anchor()
    interpolate(backbone, anchor, 1.0)
    assert all(torch.equal(trained[k], v) for k, v in _merged(backbone).items())
    interpolate(backbone, anchor, 0.0)
    assert all(torch.equal(anchor[k], v) for k, v in _merged(backbone).items())


def test_wise_halfway_is_the_mean_of_the_two_models():
    backbone, anchor, trained = _trained_from_anchor()
    interpolate(backbone, anchor, 0.5)
    for key, value in _merged(backbone).items():
        assert torch.allclose(value, (anchor[key] + trained[key]) / 2, atol=1e-6), key


# ---- end to end on tiny stages ------------------------------------------------------------------
def _mim(tmp_path, word_pieces, extra=()):
    out = tmp_path / "mim"
    main(TINY + SYNTH + ["--tokenizer", word_pieces, "--epochs", "1", "--output_dir", str(out), *extra])
    return out


def test_fisher_sidecar_round_trips_and_ewc_reads_it(tmp_path, word_pieces, capsys):
    mim = _mim(tmp_path, word_pieces, ["--fisher_samples", "16"])
    fisher, meta = load_safetensors_file(mim / FISHER_FILE)
    backbone = read_checkpoint(mim / "checkpoint-0.pth").model
    assert set(fisher) == {k[len("backbone."):] for k in backbone if k.startswith("backbone.")}
    assert meta["objective"] == "image_mim" and int(meta["batches"]) == 2  # 16 samples in batches of 8
    assert fisher["patch_embed.proj.weight"].sum() > 0  # image MIM moves the image path...
    assert fisher["text_embeddings.word_embeddings.weight"].sum() == 0  # ...and never reads text
    assert all((f >= 0).all() for f in fisher.values())
    main(TINY_BASE + SYNTH + ["--tokenizer", word_pieces, "--epochs", "1", "--exp_name", "text_mlm", "--lora_rank", "4",
                         "--cl_method", "ewc", "--reg_loss_weight", "100", "--init_from", str(mim / "checkpoint-0.pth"),
                         "--output_dir", str(tmp_path / "ewc"), "--fisher_samples", "8", "--save_merged_lora_model"])
    out = capsys.readouterr().out
    assert "ewc: Fisher information of" in out and "continual method ewc" in out
    merged = read_checkpoint(tmp_path / "ewc" / "merged_model.safetensors")
    assert merged.info["continual"] == {"method": "ewc", "fisher": FISHER_FILE}
    assert (tmp_path / "ewc" / FISHER_FILE).is_file()
    assert "train_loss_reg" in json.loads((tmp_path / "ewc" / "log.txt").read_text().splitlines()[-1])


def test_full_has_no_adapters_and_trains_every_backbone_weight_the_text_path_uses(tmp_path, word_pieces, capsys):
    mim = _mim(tmp_path, word_pieces)
    main(TINY_BASE + SYNTH + ["--tokenizer", word_pieces, "--epochs", "1", "--exp_name", "text_mlm", "--cl_method", "full",
                         "--init_from", str(mim / "checkpoint-0.pth"), "--output_dir", str(tmp_path / "full")])
    assert "LoRA" not in capsys.readouterr().out.split("trainable parameters")[1].splitlines()[0]
    before = read_checkpoint(mim / "checkpoint-0.pth").model
    after = read_checkpoint(tmp_path / "full" / "checkpoint-0.pth").model
    assert not any(is_adapter_key(k) for k in after)
    blocks = [k for k in before if k.startswith("backbone.blocks.") and "imag" not in k and "_vl" not in k]
    unchanged = [k for k in blocks if torch.equal(before[k], after[k])]
    assert blocks and not unchanged


@pytest.mark.parametrize("flags, message", [
    (["--cl_method", "lora"], "--cl_method lora trains LoRA adapters; add --lora_rank"),
    (["--cl_method", "full", "--lora_rank", "4"], "--cl_method full trains the whole backbone; drop --lora_rank 4"),
    (["--cl_method", "l2", "--lora_rank", "4"], "--cl_method l2 keeps a stage close to the previous stage's weights"),
    (["--cl_method", "l2", "--lora_rank", "4", "--self_regularization"],
     "--self_regularization is --cl_method self_reg; drop one of it and --cl_method l2"),
])
def test_flag_errors_name_the_flag_and_the_fix(tmp_path, word_pieces, flags, message, capsys):
    with pytest.raises(SystemExit):
        main(TINY_BASE + SYNTH + ["--tokenizer", word_pieces, "--exp_name", "text_mlm", "--output_dir", str(tmp_path), *flags])
    assert message in capsys.readouterr().err


def test_the_old_flags_mean_the_same_methods(tmp_path, word_pieces):
    from training.cli import pretrain_config_from_argv

    base = TINY_BASE + SYNTH + ["--tokenizer", word_pieces, "--exp_name", "text_mlm", "--output_dir", str(tmp_path)]
    assert pretrain_config_from_argv(base + ["--lora_rank", "4", "--self_regularization"]).continual.cl_method == "self_reg"
    assert pretrain_config_from_argv(base + ["--lora_rank", "4"]).continual.cl_method == "lora"
    assert pretrain_config_from_argv(base).continual.cl_method == "full"
    chosen = pretrain_config_from_argv(base + ["--lora_rank", "4", "--cl_method", "self_reg"])
    assert chosen.lora.self_regularization


@pytest.mark.parametrize("batch, ratio, sources", [(64, 0.25, 1), (64, 0.25, 2), (8, 0.5, 3), (32, 0.1, 2), (7, 0.3, 1)])
def test_replay_takes_the_share_closest_to_the_ratio(batch, ratio, sources):
    from training.continual.replay import replay_sizes

    sizes = replay_sizes(batch, ratio, sources)
    total = sum(sizes)
    best = min(range(0, 4 * batch), key=lambda r: abs(r / (batch + r) - ratio))
    assert abs(total / (batch + total) - ratio) <= abs(best / (batch + best) - ratio) + 1e-12
    assert max(sizes) - min(sizes) <= 1 and len(sizes) == sources


def test_replay_draws_the_earlier_stage_data_with_its_objective(tmp_path, word_pieces):
    """A text stage after an image MIM stage on an image folder replays that folder's images as MIM
    batches of the exact size, through the MIM head the checkpoint carries."""
    from tests.helpers import colour_folders
    from training.cli import pretrain_config_from_argv
    from training.pretrain import build_run
    from training.scaffold import RunContext

    folder = colour_folders(tmp_path / "images", 24, 8, 32)
    mim = tmp_path / "mim"
    main(TINY + ["--data_path", str(folder), "--tokenizer", word_pieces, "--epochs", "1", "--output_dir", str(mim)])
    cfg = pretrain_config_from_argv(TINY_BASE + SYNTH + [
        "--tokenizer", word_pieces, "--exp_name", "text_mlm", "--lora_rank", "4", "--cl_method", "replay",
        "--replay_ratio", "0.5", "--init_from", str(mim / "checkpoint-0.pth"), "--output_dir", str(tmp_path / "mlm")])
    ctx = RunContext.start("cpu", str(tmp_path / "mlm"), 0, exclusive=False)
    try:
        run = build_run(cfg, ctx)
        (source,) = run.method.sources
        assert source.name == "image_mim" and source.size == 8  # 8 beside the stage's 8: the share 0.5 exactly
        assert len(source.loader.dataset) == 30  # the MIM stage's training images: the folder's 32 less 2 held out
        assert str(folder) in (mim / "file_index.txt").read_text().splitlines()[0]
        batch = source.prepare(next(source.batches))
        assert batch["image"].shape[0] == 8 and "visual_token_ids" in batch and "bool_masked_pos" in batch
        assert source.mode.mim_head is run.carried.modules["mim_head"]
        assert not any(p.requires_grad for p in source.mode.mim_head.parameters())
        penalty = run.method.batch_penalty({})  # the next replayed batch's MIM loss, weight 8 / 8
        assert penalty.requires_grad and 0 < penalty.item() < 10
    finally:
        ctx.finish()
