"""The continual benchmark end to end on a tiny chain: the matrix has the reference row and one row
per stage with every probe, the summary is the one of experiments.cl_metrics, finished stages are reused."""
from __future__ import annotations

import json

import pytest

from experiments.cl_metrics import summary
from experiments.continual_benchmark import OWNER, main

TINY = ["--train_size", "128", "--val_size", "32", "--epochs", "3", "1", "1", "--num_workers", "0",
        "--fisher_samples", "64", "--lora_rank", "4"]


@pytest.mark.slow  # 42 s: over the default suite's budget; the flag checks and sweeps stay in it
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
    assert saved["methods"]["ewc"]["last_stage"]["mean"] == pytest.approx(expected["task_scores"][-1][-1])
    assert saved["methods"]["ewc"]["last_stage_chance"] == pytest.approx((1 + 5 + 10) / 3 / 32)  # 32 held-out images
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
    from experiments.continual_benchmark import parser, parse_lambdas, variants

    args = parser().parse_args(["--methods", "self_reg", "lora", "wise", "l2", "--wise_alpha", "0.3", "0.7",
                                "--lambdas", "self_reg=100,1e4", "--self_reg_scopes", "adapters"])
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
    args = parser().parse_args(["--methods", "self_reg", "self_reg+replay"])  # both forms of the penalty by default
    args.lambdas = parse_lambdas(args.lambdas)
    found = {v.name: (v.folder, v.flags) for v in variants(args)}
    assert found == {
        "self_reg": ("self_reg_lambda_10000", ("--reg_loss_weight", "10000")),
        "self_reg (all)": ("self_reg_all_lambda_10000", ("--reg_loss_weight", "10000", "--self_reg_scope", "all")),
        "self_reg+replay": ("self_reg+replay_lambda_10000", ("--reg_loss_weight", "10000")),
        "self_reg+replay (all)": ("self_reg+replay_all_lambda_10000",
                                  ("--reg_loss_weight", "10000", "--self_reg_scope", "all")),
    }


@pytest.mark.slow
def test_benchmark_on_real_data_files(tmp_path):
    """A chain on files laid out as users have them (an image folder, a caption file, pairs naming
    their images): every row measures MIM and retrieval on the held-out pairs and MLM on their
    captions, and the text stage never sees a caption of the pairs."""
    from tests.helpers import colour_folders

    root = colour_folders(tmp_path / "scenes", 160, 0, 64)
    images = sorted((root / "train").rglob("*.png"))
    colours = {p: p.parent.name for p in images}
    pairs = [{"caption": [f"a {colours[p]} thing", f"something {colours[p]}"], "filename": str(p.relative_to(root))}
             for p in images]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    captions = [{"caption": f"the {c} one number {i}"} for i, c in enumerate(["red", "green", "blue"] * 40)]
    captions += [{"caption": pairs[0]["caption"][0]}]  # also a caption of the pairs: left out of the text stage
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    out = tmp_path / "bench"
    main(["--epochs", "1", "1", "1", "--num_workers", "0", "--lora_rank", "4", "--methods", "lora",
          "--images", str(root / "train"), "--captions", str(tmp_path / "captions.json"),
          "--pairs", str(tmp_path / "pairs.json"), "--pair_images", str(root), "--output_dir", str(out)])
    matrix = json.loads((out / "results.json").read_text())["methods"]["lora"]["matrices"]["0"]
    assert len(matrix) == 4
    for row in matrix:
        assert {"image_mim_loss", "text_mlm_acc", "itc_t2i_r5"} <= set(row) and "image_knn_acc" not in row
    kept = json.loads((out / "text_stage_captions.json").read_text())
    assert len(kept) == 120 and pairs[0]["caption"][0] not in {c["caption"] for c in kept}


def test_real_data_needs_all_four_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--images", str(tmp_path), "--output_dir", str(tmp_path / "b")])
    assert "needs --captions --pairs --pair_images too" in capsys.readouterr().err


def test_the_text_first_order_checks_its_runs_and_owns_its_probes(tmp_path):
    """text MLM (shared) -> image MIM through each method -> image-text: every child command passes
    its run's own checks before anything runs (the image stage with adapters included), and the
    probes belong to the stages of that order."""
    import experiments.continual_benchmark as benchmark

    args = benchmark.parser().parse_args(["--quick", "--order", "text-first", "--output_dir", str(tmp_path)])
    args.lambdas = benchmark.parse_lambdas(args.lambdas)
    args.sizes, args.real, args.text_file = benchmark.SIZES["quick"], False, None
    args.chain = benchmark.chain(args.order)
    benchmark.check_every_run(args)
    owner = benchmark.owner_for("text-first")
    assert owner["text_mlm_acc"] == 1 and owner["image_mim_loss"] == 2 and owner["itc_t2i_r5"] == 3
    files = benchmark.SeedFiles.of(args, 0)
    assert files.first.name == "1_text_mlm" and files.visual_tokenizer.parent == files.root  # fitted up front
    assert [name for _, name in benchmark.later_stages(args)] == ["2_image_mim", "3_image_text_itc"]


@pytest.mark.slow
def test_a_text_first_chain_trains_its_image_stage_through_adapters(tmp_path):
    out = tmp_path / "bench"
    main(TINY + ["--methods", "self_reg", "--self_reg_scopes", "adapters", "--order", "text-first",
                 "--output_dir", str(out)])
    saved = json.loads((out / "results.json").read_text())
    matrix = saved["methods"]["self_reg"]["matrices"]["0"]
    assert saved["settings"]["order"] == "text-first" and len(matrix) == 4
    assert matrix[1]["text_mlm_acc"] > matrix[0]["text_mlm_acc"]  # the shared text stage learned
    assert matrix[2]["image_mim_loss"] < matrix[1]["image_mim_loss"]  # the image stage, through LoRA, learned
    assert (out / "seed_0" / "visual_tokenizer.safetensors").is_file()
    assert (out / "seed_0" / "self_reg_lambda_10000" / "2_image_mim" / "adapters.safetensors").is_file()


def test_an_mae_chain_checks_its_runs_owns_its_probes_and_leaves_joint_out(tmp_path, capsys):
    import experiments.continual_benchmark as benchmark

    args = benchmark.parser().parse_args(["--quick", "--image_objective", "mae", "--output_dir", str(tmp_path)])
    args.lambdas = benchmark.parse_lambdas(args.lambdas)
    args.sizes, args.real, args.text_file = benchmark.SIZES["quick"], False, None
    args.chain = benchmark.chain(args.order, args.image_objective)
    benchmark.check_image_objective(args, [])
    assert benchmark.JOINT not in args.methods  # its compound stage rehearses MIM, not MAE
    benchmark.check_every_run(args)  # the MAE stage's flags pass its own run's checks
    owner = benchmark.owner_for("text-first", "mae")
    assert owner["image_mae_r2"] == 2 and owner["image_mae_loss"] == 2 and "image_mim_loss" not in owner
    with pytest.raises(SystemExit):
        main(["--image_objective", "mae", "--methods", "lora", "joint", "--output_dir", str(tmp_path / "b")])
    assert "joint's compound stage trains MIM, not MAE" in capsys.readouterr().err


@pytest.mark.slow
def test_an_mae_chain_end_to_end(tmp_path):
    out = tmp_path / "bench"
    main(TINY + ["--methods", "self_reg", "replay", "--self_reg_scopes", "adapters", "--image_objective", "mae",
                 "--output_dir", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["image_objective"] == "mae"
    for method in ("self_reg", "replay"):
        matrix = saved["methods"][method]["matrices"]["0"]
        assert len(matrix) == 4 and all({"image_mae_loss", "image_mae_r2"} <= set(row) for row in matrix[1:])
        assert not any(k.startswith("image_mim") for row in matrix for k in row)
        assert matrix[1]["image_mae_loss"] < matrix[0].get("image_mae_loss", float("inf"))
    assert "MAE r² kept" in (out / "table.md").read_text()


def test_the_resolved_preset_gives_the_image_text_stage_more_epochs_at_a_lower_rate(tmp_path):
    """--preset resolved: where the adapter methods' contrastive loss no longer collapses to
    ln(batch); every child command still passes its run's own checks."""
    import experiments.continual_benchmark as benchmark

    args = benchmark.parser().parse_args(["--preset", "resolved", "--output_dir", str(tmp_path)])
    args.lambdas = benchmark.parse_lambdas(args.lambdas)
    args.sizes, args.real, args.text_file = benchmark.SIZES["resolved"], False, None
    args.chain = benchmark.chain(args.order)
    benchmark.check_every_run(args)
    files = benchmark.SeedFiles.of(args, 0)
    lora = next(v for v in benchmark.variants(args) if v.method == "lora")
    argv = benchmark.stage_argv(args, benchmark.common_flags(args, 0, files.tokenizer), lora, "image_text_itc",
                                tmp_path / "start.safetensors", files)
    assert argv[argv.index("--blr") + 1] == "5e-3" and argv[argv.index("--epochs") + 1] == "12"
    args.preset = "quick"
    argv = benchmark.stage_argv(args, [], lora, "image_text_itc", tmp_path / "start.safetensors", files)
    assert argv[argv.index("--blr") + 1] == "2e-2"  # --quick as it was
