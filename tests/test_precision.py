"""The precision a run computes in: --amp auto takes the faster of bf16 and fp32 on a CPU, and an
explicit --amp bf16 that is slower than fp32 there says so at start. A CPU without native bf16 is
made here by capping oneDNN at AVX2 (ONEDNN_MAX_CPU_ISA), which emulates bf16 as such CPUs do."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from training import precision
from training.precision import AUTO_MARGIN, resolve_amp


@pytest.mark.parametrize("speedup, chosen", [(0.02, "none"), (1.05, "none"), (4.0, "bf16")])
def test_auto_takes_bf16_only_where_it_is_clearly_faster(monkeypatch, capsys, speedup, chosen):
    monkeypatch.setattr(precision, "cpu_speedup", lambda amp: speedup)
    assert resolve_amp("auto", "cpu", "bf16") == chosen
    assert f"bf16 runs a linear layer {speedup:.2f}x as fast as fp32" in capsys.readouterr().out


def test_an_explicit_bf16_that_is_slower_is_said_and_kept(monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_speedup", lambda amp: 0.02)
    assert resolve_amp("bf16", "cpu", "bf16") == "bf16"
    out = capsys.readouterr().out
    assert "--amp bf16 is 50.0x slower than fp32 on this CPU" in out and "--amp none or --amp auto" in out
    monkeypatch.setattr(precision, "cpu_speedup", lambda amp: 3.0)
    assert resolve_amp("bf16", "cpu", "bf16") == "bf16" and capsys.readouterr().out == ""


def test_defaults_and_gpus_need_no_measurement(monkeypatch):
    monkeypatch.setattr(precision, "cpu_speedup", lambda amp: pytest.fail("measured"))
    assert resolve_amp(None, "cpu", "bf16") == "none" and resolve_amp("none", "cpu", "bf16") == "none"
    assert resolve_amp(None, "cuda", "fp16") == "fp16" and resolve_amp("auto", "cuda", "bf16") == "bf16"
    assert resolve_amp("fp16", "cuda:1", "bf16") == "fp16"


def probe(env: dict) -> list[str]:
    code = ("from training.precision import cpu_speedup, resolve_amp; "
            "print(cpu_speedup('bf16')); print(resolve_amp('auto', 'cpu', 'bf16'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_a_cpu_without_native_bf16_runs_fp32_under_auto():
    """With oneDNN capped at AVX2, bf16 is not clearly faster than fp32 (measured: 4x slower on an
    AVX2-only EPYC, 1.0-1.15x on an EPYC with avx512_bf16; the ratio depends on the machine, the
    decision does not), so auto computes in fp32."""
    lines = probe({"ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2"})
    assert float(lines[0]) < AUTO_MARGIN and lines[-1] == "none"


def test_the_measurement_decides_on_this_cpu():
    lines = probe({"OMP_NUM_THREADS": "2"})
    assert lines[-1] == ("bf16" if float(lines[0]) >= AUTO_MARGIN else "none")
