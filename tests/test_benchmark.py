"""The benchmark script runs every implementation of both modes and prints a complete table."""
from __future__ import annotations

import pytest

from util import benchmark


@pytest.mark.parametrize("mode, impls", [("encode", ["ours", "hf_sdpa", "timm"]), ("mim", ["ours", "hf_sdpa"])])
def test_benchmark_prints_a_row_per_implementation(capsys, mode, impls):
    benchmark.main(["--mode", mode, "--size", "tiny", "--image_size", "32", "--batch_size", "2", "--steps", "1",
                    "--warmup", "0", "--device", "cpu", "--impls", *impls])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == impls
    assert "error" not in out
