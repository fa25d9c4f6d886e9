"""One run of an experiment script, reused when it finished before: the experiment utilities
(transfer, segmentation, targets) take hours, and a rerun after an interruption should redo only
what did not finish. A folder an interrupted run left is renamed aside, never deleted."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

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
