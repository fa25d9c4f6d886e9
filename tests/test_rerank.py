"""Re-ranked retrieval (VLMo): the matching head re-orders each contrastive shortlist of k and
nothing else; with an oracle scorer R@1 becomes perfect whenever the true caption made the
shortlist; k = 1 changes nothing; and `--rerank_k` fine-tunes the matching head alongside ITC and
reports both rankings, read back the same from its checkpoint."""
from __future__ import annotations

import pytest
import torch

from models.retrieval import recall_at_k, reranked, reranked_recalls
from tests.test_retrieval_finetune import FAST, synthetic_pairs, word_pieces  # noqa: F401 - fixture

OWNER = torch.arange(6).repeat_interleave(2)  # 6 images, 2 captions each


def shuffled_similarity(true_rank: int) -> torch.Tensor:
    """Image i's own captions at rank `true_rank` (0-based) of its row, by construction."""
    gen = torch.Generator().manual_seed(0)
    similarity = torch.rand(6, 12, generator=gen)
    for i in range(6):
        order = similarity[i].argsort(descending=True)
        own = (OWNER == i).nonzero().squeeze(1)
        similarity[i, own] = similarity[i, order[true_rank]] - 1e-3 * torch.arange(1, 3)  # just below that rank
    return similarity


def oracle(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
    return (OWNER[text_index] == image_index).float() * 10 - 5


def test_the_shortlist_is_reordered_and_the_rest_keeps_its_order():
    similarity = shuffled_similarity(true_rank=3)
    assert recall_at_k(similarity, OWNER)["itc_i2t_r1"] == 0.0
    assert reranked_recalls(similarity, OWNER, 5, oracle)["rerank_i2t_r1"] == 1.0  # the truth was in the top 5
    assert reranked_recalls(similarity, OWNER, 2, oracle)["rerank_i2t_r1"] == 0.0  # it was not in the top 2
    i2t, _ = reranked(similarity, 5, oracle)
    top5 = similarity.topk(5, dim=1).indices
    rest = torch.ones_like(similarity, dtype=torch.bool).scatter_(1, top5, False)
    assert (i2t[rest] == similarity[rest]).all()  # outside the shortlist nothing moves
    assert (i2t.gather(1, top5).min(1).values > similarity.max()).all()  # the shortlist stays ahead


def test_a_shortlist_of_one_changes_nothing():
    similarity = torch.rand(6, 12, generator=torch.Generator().manual_seed(1))
    plain = recall_at_k(similarity, OWNER)
    again = reranked_recalls(similarity, OWNER, 1, lambda i, t: torch.randn(len(i)))
    assert again == {f"rerank_{k[4:]}": v for k, v in plain.items()}


def test_rerank_fine_tuning_trains_the_matching_head_and_reports_both_rankings(tmp_path, word_pieces):  # noqa: F811
    from main_finetune import main as finetune
    from models.checkpoints import read_model_checkpoint

    pairs = synthetic_pairs(tmp_path, 40, seed=4)
    out = tmp_path / "run"
    common = ["--task", "image_text_retrieval", "--data_file_path", str(pairs), "--data_path", str(tmp_path),
              "--tokenizer", word_pieces, "--rerank_k", "3", "--val_fraction", "0.3"] + FAST
    stats = finetune(common + ["--epochs", "1", "--batch_size", "8", "--lr", "3e-4", "--output_dir", str(out)])
    for key in ("test_itc_i2t_r1", "test_rerank_i2t_r1", "test_rerank_t2i_r10", "test_rerank_r_mean", "train_loss_itm"):
        assert key in stats, key
    ckpt = read_model_checkpoint(str(out / "checkpoint-best.pth"))
    assert {"pooler.dense.weight", "itm_head.fc.weight"} <= set(ckpt.model)
    again = finetune(common + ["--eval", "--finetune", str(out / "checkpoint-best.pth"),
                               "--output_dir", str(tmp_path / "eval")])
    assert again["rerank_r_mean"] == pytest.approx(stats["test_rerank_r_mean"], abs=1e-9)
    from util.export import main as export

    diffs = export(["--checkpoint", str(out / "checkpoint-best.pth"), "--format", "onnx", "--output",
                    str(tmp_path / "onnx")])  # the re-ranker too, checked at another batch and text length
    assert (tmp_path / "onnx" / "image_text_matching.onnx").is_file() and diffs["image_text_matching"] < 1e-4


def test_rerank_k_belongs_to_retrieval():
    from common.errors import UserError
    from training.cli import finetune_config_from_argv

    with pytest.raises(UserError, match="--rerank_k applies to --task image_text_retrieval"):
        finetune_config_from_argv(["--task", "image_classification", "--data_path", ".", "--rerank_k", "4"])
