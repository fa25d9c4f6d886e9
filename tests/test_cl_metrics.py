"""The continual-learning metrics on a matrix computed by hand."""
import pytest

import math

from experiments.cl_metrics import mim_gain, summary

MATRIX = [  # reference, then after image MIM, text MLM, image-text ITC
    {"image_knn_acc": 0.4, "image_mim_acc": 0.0, "image_mim_loss": 5.0, "text_mlm_acc": 0.0, "itc_t2i_r5": 0.02},
    {"image_knn_acc": 0.6, "image_mim_acc": 0.4, "image_mim_loss": 2.0, "text_mlm_acc": 0.1, "itc_t2i_r5": 0.03},
    {"image_knn_acc": 0.5, "image_mim_acc": 0.2, "image_mim_loss": 3.0, "text_mlm_acc": 0.6, "itc_t2i_r5": 0.05},
    {"image_knn_acc": 0.45, "image_mim_acc": 0.1, "image_mim_loss": 4.0, "text_mlm_acc": 0.4, "itc_t2i_r5": 0.3},
]
OWNER = {"image_knn_acc": 1, "image_mim_acc": 1, "image_mim_loss": 1, "text_mlm_acc": 2, "itc_t2i_r5": 3}


def test_summary_matches_hand_computation():
    s = summary(MATRIX, OWNER)
    # task scores (fractions only, MIM accuracy left out): image = k-NN -> 0.4, 0.6, 0.5, 0.45
    assert s["task_scores"][3] == pytest.approx([0.45, 0.4, 0.3])
    assert s["acc"] == pytest.approx((0.45 + 0.4 + 0.3) / 3)
    assert s["bwt"] == pytest.approx(((0.45 - 0.6) + (0.4 - 0.6)) / 2)
    assert s["fwt"] == pytest.approx(((0.1 - 0.0) + (0.05 - 0.02)) / 2)
    assert s["forgetting"] == pytest.approx(((0.6 - 0.45) + (0.6 - 0.4)) / 2)
    assert s["probes"]["image_mim_acc"]["bwt"] == pytest.approx(0.1 - 0.4)  # shown per probe all the same


def test_mim_gain_is_zero_for_a_uniform_guess_and_one_for_certainty():
    assert mim_gain(math.log(128), 128) == pytest.approx(0.0)
    assert mim_gain(0.0, 128) == 1.0
    assert mim_gain(math.log(128) / 2, 128) == pytest.approx(0.5)


def test_losses_are_turned_round_per_probe():
    loss = summary(MATRIX, OWNER)["probes"]["image_mim_loss"]
    assert loss["bwt"] == pytest.approx(-2.0)  # 2.0 -> 4.0 is a loss of 2 nats
    assert loss["forgetting"] == pytest.approx(2.0)  # best earlier (2.0) against the last (4.0)
    assert loss["kept"] == pytest.approx(0.5)


def test_per_probe_kept_and_the_last_stage():
    probes = summary(MATRIX, OWNER)["probes"]
    assert probes["text_mlm_acc"]["kept"] == pytest.approx(0.4 / 0.6)
    assert probes["image_knn_acc"]["forgetting"] == pytest.approx(0.6 - 0.45)
    last = probes["itc_t2i_r5"]
    assert last["bwt"] == 0 and last["forgetting"] is None and last["kept"] == 1


def test_no_forgetting_gives_zero_and_missing_probes_are_skipped():
    flat = [{"a_acc": 0.5}, {"a_acc": 0.7, "b_acc": 0.1}, {"a_acc": 0.7, "b_acc": 0.9}]
    s = summary(flat, {"a_acc": 1, "b_acc": 2, "never_trained": 5})
    assert s["bwt"] == 0 and s["forgetting"] == 0
    assert s["fwt"] is None  # stage 2's probe has no reference value
    assert s["acc"] == pytest.approx(0.8)


def test_one_stage_has_no_backward_metrics():
    s = summary(MATRIX[:2], OWNER)
    assert s["bwt"] is None and s["forgetting"] is None and s["acc"] == pytest.approx(0.6)
    with pytest.raises(ValueError):
        summary(MATRIX[:1], OWNER)
