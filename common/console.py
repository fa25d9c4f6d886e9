"""What a run tells its user, said once: in a multi-process run only rank 0 speaks (the launcher's
RANK variable decides, so this also holds before the process group exists)."""
from __future__ import annotations

import os


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def say(message: str) -> None:
    if is_rank_zero():
        print(message, flush=True)
