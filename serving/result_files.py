"""Where predictions go: the results as one JSON object, and the unreadable inputs beside it."""
from __future__ import annotations

import json
from pathlib import Path


def write_results(output: Path, results: dict, failed: dict) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    if failed:
        (output.with_suffix(".errors.json")).write_text(json.dumps(failed, indent=1))


def reason(err: Exception) -> str:
    """One line saying why an input could not be read."""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
