"""One run of an experiment script, reused when it finished before: the experiment utilities
(transfer, segmentation, targets) take hours, and a rerun after an interruption should redo only
what did not finish. A folder an interrupted run left is renamed aside, never deleted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

RESULT = "run_result.json"


def finished_or_run(folder: Path, run: Callable[[], dict]) -> dict:
    """`folder/run_result.json` when this run finished before; otherwise `run()` (into `folder`),
    whose result is written there for the next time."""
    done = folder / RESULT
    if done.is_file():
        print(f"reusing the finished run in {folder}", flush=True)
        return json.loads(done.read_text())
    if folder.exists():
        aside = folder.with_name(f"{folder.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(aside)
        print(f"{folder} holds a run that did not finish; moved it to {aside} and starting it again", flush=True)
    result = run()
    folder.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result))
    return result


def run_script(argv: list[str], log: Path, append: bool = False) -> dict[str, float]:
    """`python ARGV` from the project root in its own process (its peak memory is its own), output to
    `log`; its wall seconds, CPU seconds (with its loader workers) and peak memory. A failure is one
    sentence naming the log and its last line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with log.open("a" if append else "w") as out:
        child = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise UserError(f"a step failed; its output is in {log}: {log.read_text().strip().splitlines()[-1:]}")
    return {"seconds": round(time.time() - start, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
