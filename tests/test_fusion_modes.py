"""VLMo's fusion pretraining modes. Image-text matching: hard negatives are never the pair itself
(nor a word-for-word copy of its caption), follow the ITC similarities, and are the same global draw
on every rank (2 gloo processes); the mode trains the fusion path and its heads, not the ITC head
that ranks. Image-conditioned MLM: the masked words are read from the fused sequence, so the
picture changes the prediction and the image path gets gradients."""
from __future__ import annotations

import pytest
import torch

from models import create_model
from models.modes import ImageTextITM, ImageTextMLM, ModeOptions
from models.modes.image_text_itm import hard_negatives, same_captions
from tests.distributed_harness import run_in_processes

GRID, BATCH, LENGTH = 2, 4, 6


@pytest.mark.parametrize("seed", range(5))
def test_negatives_are_never_the_pair_itself_even_when_the_pair_dominates(seed):
    n = 16
    similarity = torch.randn(n, n, generator=torch.Generator().manual_seed(seed)) + 60 * torch.eye(n)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(20):
        for drawn in hard_negatives(similarity, gen):
            assert not (drawn == torch.arange(n)).any()


def test_negatives_follow_the_similarities_and_skip_identical_captions():
    n = 6
    similarity = torch.zeros(n, n)
    similarity[torch.arange(n), (torch.arange(n) + 1) % n] = 8.0  # caption i+1 looks most like image i
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([hard_negatives(similarity, gen)[0] for _ in range(200)])
    assert (draws == (torch.arange(n) + 1) % n).float().mean() > 0.9
    ids = torch.tensor([[5, 6], [5, 6], [7, 8], [9, 9], [5, 6], [1, 2]])  # rows 0, 1 and 4 say the same
    same = same_captions(ids)
    for _ in range(50):
        text_for_image, _ = hard_negatives(torch.zeros(n, n), gen, same)
        for i in (0, 1, 4):
            assert text_for_image[i].item() not in (0, 1, 4)
    everything_same = torch.ones(n, n, dtype=torch.bool)  # nothing but copies left: any other pair
    drawn, _ = hard_negatives(torch.zeros(n, n), gen, everything_same)
    assert not (drawn == torch.arange(n)).any()


def _mode(seed: int = 0) -> ImageTextITM:
    torch.manual_seed(seed)
    backbone = create_model("vlmo_tiny_patch16", img_size=GRID * 8, patch_size=8, ffn="multiway", vocab_size=32,
                            max_text_len=LENGTH, vlffn_start_layer_index=2, drop_path_rate=0.0)
    return ImageTextITM(backbone, ModeOptions(seed=3))


def _batch(offset: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + offset)
    return {"image": torch.randn(BATCH, 3, GRID * 8, GRID * 8, generator=gen),
            "input_ids": torch.randint(1, 32, (BATCH, LENGTH), generator=gen),
            "attention_mask": torch.ones(BATCH, LENGTH, dtype=torch.long)}


def test_the_mode_trains_the_fusion_path_and_its_heads_but_not_the_ranking_itc_head():
    mode = _mode().train()
    frozen = set(mode.frozen_parameter_names())
    assert {n for n, _ in mode.named_parameters() if n.startswith("itc_head.")} <= frozen
    out = mode(_batch(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and 0 <= out["acc_itm"] <= 1
    for name in ("pooler.dense.weight", "itm_head.fc.weight", "backbone.blocks.3.mlp_vl.fc1.weight",
                 "backbone.token_type_embeddings.weight", "backbone.blocks.0.mlp_text.fc1.weight"):
        assert mode.get_parameter(name).grad is not None, name
    assert mode.itc_head.logit_scale.grad is None


def _rank_worker(rank: int, world: int, out_path: str) -> None:
    from common import distributed as dist_util

    mode = _mode()
    mode.options.gather = dist_util.gather_with_grad
    mode.train()(_batch(rank))["loss"].backward()  # every rank its own pairs
    torch.save([t.clone() for t in mode.last_negatives], f"{out_path}.{rank}")


def test_two_ranks_draw_the_same_global_negatives(tmp_path):
    run_in_processes(_rank_worker, 2, str(tmp_path / "negatives"))
    first, second = (torch.load(tmp_path / f"negatives.{r}", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert len(first[0]) == 2 * BATCH and not (first[0] == torch.arange(2 * BATCH)).any()


def test_image_conditioned_mlm_reads_the_picture():
    torch.manual_seed(0)
    backbone = create_model("vlmo_tiny_patch16", img_size=GRID * 8, patch_size=8, ffn="multiway", vocab_size=32,
                            max_text_len=LENGTH, vlffn_start_layer_index=2, drop_path_rate=0.0)
    mode = ImageTextMLM(backbone).train()
    batch = _batch(0)
    labels = torch.full((BATCH, LENGTH), -100)
    labels[:, 2] = batch["input_ids"][:, 2]
    masked_ids = batch["input_ids"].clone()
    masked_ids[:, 2] = 3  # the [MASK] id of this toy vocabulary
    batch.update(mlm_input_ids=masked_ids, mlm_labels=labels)
    out = mode(batch)
    out["loss"].backward()
    assert mode.backbone.patch_embed.proj.weight.grad is not None  # the image path is trained through the words
    with torch.no_grad():
        other = {**batch, "image": torch.randn_like(batch["image"])}
        from models.modes.image_text_mlm import fused_mlm_logits

        assert (fused_mlm_logits(backbone, mode.mlm_head, batch)[0]
                - fused_mlm_logits(backbone, mode.mlm_head, other)[0]).abs().max() > 1e-4


def _compound(itm: float, fused_mlm: bool = False):
    from models.modes import CompoundPretrain

    torch.manual_seed(0)
    backbone = create_model("vlmo_tiny_patch16", img_size=GRID * 8, patch_size=8, vocab_size=32, max_text_len=LENGTH,
                            drop_path_rate=0.0)
    return CompoundPretrain(backbone, ModeOptions(visual_vocab_size=8, itm_conduct_prob=itm, fused_mlm=fused_mlm, seed=5))


def _compound_batch() -> dict:
    batch = _batch(0)
    labels = torch.full((BATCH, LENGTH), -100)
    labels[:, 1] = batch["input_ids"][:, 1]
    batch.update(mlm_input_ids=batch["input_ids"], mlm_labels=labels, bool_masked_pos=torch.zeros(BATCH, GRID * GRID,
                 dtype=torch.bool), visual_token_ids=torch.zeros(BATCH, GRID * GRID, dtype=torch.long))
    batch["bool_masked_pos"][:, 0] = True
    return batch


def test_compound_without_itm_draws_exactly_the_three_objectives_it_always_drew():
    import random

    mode = _compound(0.0).train()
    assert mode.heads == ("mim_head", "mlm_head", "itc_head") and not hasattr(mode, "itm_head")
    reference = random.Random("5:0")  # three draws a step, as before ITM existed
    for _ in range(50):
        mim, mlm, itc = (reference.random() < p for p in (0.3, 0.8, 1.0))
        itc = (itc and not mim) or not (mim or mlm or (itc and not mim))
        assert mode.draw() == (mim, mlm, itc, False)


def test_compound_with_itm_trains_the_matching_head():
    mode = _compound(1.0).train()
    assert mode.heads[-2:] == ("pooler", "itm_head")
    out = mode(_compound_batch())
    assert "loss_itm" in out and "acc_itm" in out
    out["loss"].backward()
    assert mode.itm_head.fc.weight.grad is not None and mode.pooler.dense.weight.grad is not None


def test_compound_fused_mlm_reads_the_words_from_the_pair():
    """With fused_mlm the MLM loss is image_text_mlm's (the picture changes it); without, text_mlm's."""
    from models.modes.image_text_mlm import fused_mlm_logits
    from models.modes.text_mlm import loss_and_accuracy, mlm_loss

    batch = _compound_batch()
    for fused in (False, True):
        mode = _compound(0.0, fused_mlm=fused).eval()
        assert ("pair" in mode.paths) == fused
        with torch.no_grad():
            out = mode(batch)
            expected = (loss_and_accuracy(*fused_mlm_logits(mode.backbone, mode.mlm_head, batch)) if fused
                        else mlm_loss(mode.backbone, mode.mlm_head, batch))
        assert torch.allclose(out["loss_mlm"], expected[0])


def test_compound_draws_continue_from_a_mid_epoch_checkpoint_state(tmp_path):
    """step_state goes into a step checkpoint (read with weights_only); a mode given it back after
    set_epoch draws what the uninterrupted one draws next."""
    mode, resumed = _compound(0.5).train(), _compound(0.5).train()
    mode.set_epoch(3)
    for _ in range(7):
        mode.draw()
    torch.save({"mode": mode.step_state()}, tmp_path / "state.pth")
    resumed.set_epoch(3)
    resumed.load_step_state(torch.load(tmp_path / "state.pth", weights_only=True)["mode"])
    assert [resumed.draw() for _ in range(20)] == [mode.draw() for _ in range(20)]
