"""The benchmark script runs every implementation of both modes in interleaved rounds and prints a
complete table with each row's speed relative to the reference."""
from __future__ import annotations

import pytest

from experiments import benchmark


def table_rows(out: str) -> list[list[str]]:
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


@pytest.mark.parametrize("mode, impls", [("encode", ["ours", "ours_bf16", "hf_sdpa", "timm"]),
                                         ("mim", ["ours", "hf_sdpa"]), ("mlm", ["ours", "hf_sdpa"]),
                                         ("itc", ["ours", "hf_eager", "hf_sdpa"])])
def test_benchmark_prints_a_row_per_implementation(capsys, mode, impls):
    benchmark.main(["--mode", mode, "--size", "tiny", "--image_size", "32", "--batch_size", "2", "--steps", "1",
                    "--warmup", "0", "--rounds", "1", "--device", "cpu", "--impls", *impls])
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert [r[0] for r in rows] == impls and "error" not in out
    assert next(r for r in rows if r[0] == "hf_sdpa")[-1] == "1.00x"
    assert all(r[-1].endswith("x") and float(r[-1][:-1]) > 0 for r in rows)


def test_rounds_interleave_the_implementations(monkeypatch):
    calls = []

    def fake_worker(impl, argv):
        calls.append(impl)
        return {"impl": impl, "step_s": 1.0 + len(calls), "images_per_s": 1.0, "peak_mb": 10.0 * len(calls)}

    monkeypatch.setattr(benchmark, "run_worker", fake_worker)
    rows = benchmark.interleaved_rounds(["ours", "hf_sdpa"], 3, [])
    assert calls == ["ours", "hf_sdpa"] * 3
    ours = rows[0]  # steps 2, 4, 6: median 4, spread 2-6, worst peak of its runs
    assert (ours["step_s"], ours["min_s"], ours["max_s"], ours["peak_mb"]) == (4.0, 2.0, 6.0, 50.0)


def test_a_failing_implementation_is_not_retried_and_keeps_its_row(monkeypatch):
    calls = []

    def fake_worker(impl, argv):
        calls.append(impl)
        return {"impl": impl, "error": "boom"} if impl == "timm" else \
            {"impl": impl, "step_s": 1.0, "images_per_s": 1.0, "peak_mb": 1.0}

    monkeypatch.setattr(benchmark, "run_worker", fake_worker)
    rows = benchmark.interleaved_rounds(["ours", "timm"], 3, [])
    assert calls.count("timm") == 1 and rows[1] == {"impl": "timm", "error": "boom"}


def test_adamw_mode_compares_the_three_implementations(capsys):
    benchmark.main(["--mode", "adamw", "--size", "tiny", "--rounds", "1", "--steps", "2"])
    rows = table_rows(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["for_loop", "foreach", "fused"] and rows[0][2] == "1.00x"
    assert all(float(r[3]) < 1e-5 for r in rows)  # the same update


def test_loader_mode_times_every_stage_and_sums_them(capsys):
    import torch

    threads = torch.get_num_threads()
    benchmark.main(["--mode", "loader", "--num_images", "4", "--batch_size", "2", "--image_size", "64"])
    assert torch.get_num_threads() == threads  # later work in this process keeps its threads (and numbers)
    out, streamed = capsys.readouterr().out.split("streamed from tar shards")
    rows = {r[0]: float(r[1]) for r in table_rows(out)}
    stages = [k for k in rows if "whole" not in k and "draft" not in k and "of which" not in k]
    assert len(stages) == 4 and all(v > 0 for v in rows.values())
    assert abs(rows["**whole sample (full-size decode)**"] - sum(rows[k] for k in stages)) < 0.02
    as_read = [k for k in rows if "as the loader reads it" in k]
    assert len(as_read) == 1 and "% of crops" in as_read[0] and rows[as_read[0]] > 0
    assert "needs" in out and "workers" in out and "decoding every image at full size" in out
    shards = {r[0]: r[1:] for r in table_rows("|" + streamed.split("\n|", 1)[1])}
    assert list(shards) == ["read + decode from a local tar shard", "read + decode from a pipe:cat of the shard",
                            "read + decode over HTTP from a loopback server (pipe:curl)",
                            "read + decode over HTTP from a loopback server (fsspec)",
                            "read + decode from a loopback S3 server (moto; fsspec/s3fs)"]
    assert all(float(ms) > 0 and int(workers) >= 1 for ms, _, workers in shards.values())


def test_tokenizer_mode_reports_speed_and_agreement_with_fp32(capsys):
    benchmark.main(["--mode", "tokenizer", "--batch_size", "2", "--image_size", "64", "--rounds", "1", "--steps", "1"])
    rows = table_rows(capsys.readouterr().out)
    assert [r[:2] for r in rows] == [
        ["DALL-E", "fp32"], ["DALL-E", "fp32 channels-last"], ["DALL-E", "bf16 autocast"],
        ["DALL-E", "bf16 channels-last"], ["DALL-E", "fp32 channels-last, --compile"],
        ["DALL-E", "bf16 channels-last, --compile"], ["k-means", "(256 tokens) fp32"],
        ["k-means", "(256 tokens) bf16 autocast"]]
    by_variant = {tuple(r[:2]): r[2:] for r in rows}
    for reference in (("DALL-E", "fp32"), ("k-means", "(256 tokens) fp32")):
        assert by_variant[reference][1:] == ["1.00x", "100.00%"]
    assert by_variant[("DALL-E", "fp32 channels-last")][2] == "100.00%"  # layout alone changes no id
    assert all(0 < float(r[4].rstrip("%")) <= 100 and float(r[2]) > 0 for r in rows)


def test_sweep_runs_our_step_at_each_size_and_batch(capsys):
    rows = benchmark.main(["--mode", "encode", "--sweep", "--size", "tiny", "--sweep_image_sizes", "32", "64",
                           "--sweep_batch_sizes", "1", "4", "--steps", "1", "--warmup", "0", "--device", "cpu"])
    assert [(r["image_size"], r["batch"]) for r in rows] == [(32, 1), (32, 4), (64, 1), (64, 4)]
    assert all("error" not in r and r["step_s"] > 0 for r in rows)
    assert len(table_rows(capsys.readouterr().out)) == 4


def test_the_mae_step_is_the_same_objective_in_both_rows():
    """--mode mae: ours (MAE-shaped) and HF's ViTMAE take the same images and masks of the same share."""
    import torch

    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    mask = benchmark.mae_masks(2, 4, torch.device("cpu"))
    assert mask.sum(1).tolist() == [12, 12]  # 16 patches, 4 kept: MAE's int(16 · 0.25)
    for impl in ("ours", "hf_sdpa"):
        model, loss_fn = benchmark.build_mae(impl, "tiny", 64)
        loss = loss_fn(images, mask)
        assert loss.ndim == 0 and 0 < loss.item() < 10  # normalised pixels: about 1 at the start
        loss.backward()
        blocks = model.backbone.blocks if impl == "ours" else model.vit.layers
        assert all(p.grad is not None for p in blocks.parameters())  # the encoder trains in both
