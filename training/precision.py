"""Which precision a run computes in. On a GPU `--amp` means bf16 (or `--gpu_amp`); on a CPU it is
a measured choice: bf16 (and fp16) matmuls are fast only where the CPU has instructions for them
(avx512_bf16, AMX), and elsewhere oneDNN emulates them, 4x slower per linear layer and up to 100x per
plain matmul than fp32 (AVX2-only AMD EPYC, for one; experiments/benchmark.py --mode precision). So a
reduced precision on a CPU is timed against fp32 on a linear layer of a transformer's shape at
start: `--amp auto` takes the faster, and an explicit `--amp bf16` that is slower is said."""
from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

from common.console import say

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
AUTO_MARGIN = 1.2  # a reduced precision is taken only when it is clearly faster: it also costs accuracy


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def native_support(amp: str) -> str:
    found = [flag for flag in NATIVE_FLAGS[amp] if flag in cpu_flags()]
    return f"it has {' and '.join(found)}" if found else f"it has no {' or '.join(NATIVE_FLAGS[amp])}"


def _best_time(run, repeats: int = 3) -> float:
    run()  # warm-up: kernel selection, allocation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def cpu_speedup(amp: str) -> float:
    """fp32 time / `amp` time of a [256, 384] x [384, 1536] linear layer under CPU autocast (about
    a tenth of a second even where the reduced precision is emulated)."""
    gen = torch.Generator().manual_seed(0)
    x, layer = torch.randn(256, 384, generator=gen), torch.nn.Linear(384, 1536)

    def forward(dtype: torch.dtype | None):
        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                layer(x)
        return run

    return _best_time(forward(None)) / _best_time(forward(DTYPES[amp]))


def resolve_amp(amp: str | None, device: str, gpu_amp: str) -> str:
    """The precision to run in: `--amp` as given ('auto' resolved), bf16 (or `--gpu_amp`) on a GPU and
    none (fp32) on a CPU by default."""
    if device.startswith("cuda"):
        return gpu_amp if amp in (None, "auto") else amp
    if amp is None or amp == "none":
        return "none"
    if amp == "auto":
        speedup = cpu_speedup("bf16")
        choice = "bf16" if speedup >= AUTO_MARGIN else "none"
        say(f"--amp auto: bf16 runs a linear layer {speedup:.2f}x as fast as fp32 on this CPU ({native_support('bf16')}); "
            f"computing in {'bf16' if choice == 'bf16' else 'fp32 (--amp none)'}")
        return choice
    speedup = cpu_speedup(amp)
    if speedup < 1:
        say(f"warning: --amp {amp} is {1 / speedup:.1f}x slower than fp32 on this CPU ({native_support(amp)}, so "
            f"{amp} is emulated); --amp none or --amp auto is faster here")
    return amp
