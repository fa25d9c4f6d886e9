"""One run of an experiment script, reused when it finished before: the experiment utilities
(transfer, segmentation, targets) take hours, and a rerun after an interruption should redo only
what did not finish. A folder an interrupted run left is renamed aside, never deleted."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

RESULT = "run_result.json"
SETTINGS = "run_settings.json"  # what the result was made with


def finished_or_run(folder: Path, run: Callable[[], dict], settings: object = None) -> dict:
    """`folder/run_result.json` when this run finished before with the same `settings` (its command
    line: weights, data, epochs, flags); otherwise `run()` (into `folder`), whose result and settings
    are written there for the next time. A folder an interrupted run left, or a finished run made
    with other settings, is renamed aside first: a rerun with other flags is never answered with
    the old run's figures. A result saved before settings were recorded is reused."""
    done, recorded = folder / RESULT, folder / SETTINGS
    if done.is_file() and (settings is None or not recorded.is_file()
                           or json.loads(recorded.read_text()) == json.loads(json.dumps(settings))):
        print(f"reusing the finished run in {folder}", flush=True)
        return json.loads(done.read_text())
    if folder.exists():
        kind, why = (("other-settings", "was made with other settings") if done.is_file()
                     else ("interrupted", "did not finish"))
        aside = folder.with_name(f"{folder.name}.{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(aside)
        print(f"{folder} holds a run that {why}; moved it to {aside} and starting it again", flush=True)
    result = run()
    folder.mkdir(parents=True, exist_ok=True)
    if settings is not None:
        recorded.write_text(json.dumps(settings))
    done.write_text(json.dumps(result))  # last: a run killed before this line is one that did not finish
    return result


NOT_RESULTS = ("--num_workers", "--print_freq")  # flags that change how a run goes, not its figures


def result_settings(argv: list[str]) -> list[str]:
    """A run's command line without the flags (and their values) that do not change its result."""
    kept, skip = [], False
    for arg in argv:
        kept += [] if skip or arg in NOT_RESULTS else [arg]
        skip = arg in NOT_RESULTS
    return kept


STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def stopped_with(child: subprocess.Popen):
    """While `child` runs: a SIGTERM, SIGINT or SIGHUP to this process stops the child and its own
    processes (its loader workers: one process group) before this one ends, so that stopping an
    experiment never leaves a training run behind that goes on writing into its folder."""
    def stop(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():  # handlers belong to the main thread
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in STOPPING}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_script(argv: list[str], log: Path, append: bool = False) -> dict[str, float]:
    """`python ARGV` from the project root in its own process (its peak memory is its own), output to
    `log`; its wall seconds, CPU seconds (with its loader workers) and peak memory. A failure is one
    sentence naming the log and its last line; stopping this process stops the child too."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with log.open("a" if append else "w") as out:
        child = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                 start_new_session=True)
        with stopped_with(child):
            _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise UserError(f"a step failed; its output is in {log}: {log.read_text().strip().splitlines()[-1:]}")
    return {"seconds": round(time.time() - start, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
