"""The continual benchmark end to end on a tiny chain: the matrix has the reference row and one row
per stage with every probe, the summary is the one of common.cl_metrics, finished stages are reused."""
from __future__ import annotations

import json

import pytest

from common.cl_metrics import summary
from util.continual_benchmark import OWNER, main

TINY = ["--train_size", "64", "--val_size", "32", "--epochs", "1", "1", "1", "--num_workers", "0",
        "--fisher_samples", "64", "--lora_rank", "4"]


def test_benchmark_end_to_end_and_reuse(tmp_path, capsys):
    out = tmp_path / "bench"
    results = main(TINY + ["--methods", "ewc", "--output_dir", str(out)])
    saved = json.loads((out / "results.json").read_text())
    matrix = saved["methods"]["ewc"]["matrices"]["0"]
    assert len(matrix) == 4  # reference, image MIM, text MLM, image-text
    assert all(set(OWNER) <= set(row) for row in matrix)  # every probe in every row, heads to come included
    expected = summary(matrix, OWNER)
    assert saved["methods"]["ewc"]["acc"]["mean"] == pytest.approx(expected["acc"])
    assert saved["methods"]["ewc"]["bwt"]["mean"] == pytest.approx(expected["bwt"])
    assert matrix[1]["image_mim_loss"] < matrix[0]["image_mim_loss"]  # the MIM stage learned
    assert (out / "seed_0" / "1_image_mim" / "fisher.safetensors").is_file()
    assert (out / "chart.png").is_file() and (out / "stability_plasticity.png").is_file() and "| ewc |" in (out / "table.md").read_text()
    cost = results["ewc"]["cost"]
    assert cost["stored_parameters"]["mean"] < cost["trainable_parameters"]["mean"]  # adapters, not the model
    capsys.readouterr()
    main(TINY + ["--methods", "ewc", "--output_dir", str(out)])  # everything found: nothing re-runs
    assert "ewc text_mlm" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["methods"]["ewc"]["matrices"]["0"] == matrix


def test_lambdas_are_checked():
    with pytest.raises(SystemExit):
        main(["--lambdas", "ewc=lots"])
    with pytest.raises(SystemExit):
        main(["--lambdas", "full=3"])


def test_sweeps_make_one_variant_per_value_each_in_its_own_folder():
    from util.continual_benchmark import parser, parse_lambdas, variants

    args = parser().parse_args(["--methods", "self_reg", "lora", "wise", "l2", "--wise_alpha", "0.3", "0.7",
                                "--lambdas", "self_reg=100,1e4"])
    args.lambdas = parse_lambdas(args.lambdas)
    found = {v.name: (v.folder, v.flags) for v in variants(args)}
    assert found == {
        "self_reg λ=100": ("self_reg_lambda_100", ("--reg_loss_weight", "100")),
        "self_reg λ=10000": ("self_reg_lambda_10000", ("--reg_loss_weight", "10000")),
        "lora": ("lora", ()),
        "wise α=0.3": ("wise_alpha_0.3", ("--wise_alpha", "0.3")),
        "wise α=0.7": ("wise_alpha_0.7", ("--wise_alpha", "0.7")),
        "l2": ("l2_lambda_30", ("--reg_loss_weight", "30")),  # the default λ, named in the folder all the same
    }
