"""User-facing errors: one sentence that names the file or flag and the fix, no traceback."""
from __future__ import annotations

import faulthandler
import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix (path, format, flag combination, shape). Entry points print
    its message alone and exit with status 2."""


def first_line(text: str, limit: int = 200) -> str:
    """The first line of an underlying error's message, for quoting it inside one sentence; a longer
    one ends at a word, with a visible "..." (never cut mid-word as if it were whole)."""
    if not text.strip():
        return "unknown error"
    line = text.strip().splitlines()[0]
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."


def cli_entry(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a CLI `main` so a `UserError` prints `error: <sentence>` instead of a traceback, and a
    crash below Python (a segfault in a native library) prints where each thread was, instead of
    the launcher's bare "Signal 11"."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if not faulthandler.is_enabled():
            faulthandler.enable()
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except RuntimeError as err:
            if not peer_lost(err):
                raise
            first = str(err).strip().splitlines()[0][:200]
            print(f"error: another process of this run stopped (its node or process died: {first}); this one stops "
                  f"too. Start the run again with --auto_resume to continue from its last checkpoint", file=sys.stderr)
            raise SystemExit(3) from None

    return wrapper


PEER_LOST = ("Connection reset by peer", "Connection closed", "Connection was likely closed", "Broken pipe")


def peer_lost(err: BaseException) -> bool:
    """A collective failed because another process of the run is gone (gloo / NCCL / the store)."""
    import torch.distributed as dist

    return isinstance(err, getattr(dist, "DistNetworkError", ())) or any(p in str(err) for p in PEER_LOST)
