"""Where predictions go: the results as one JSON object, and the unreadable inputs beside it. The
output path is checked before any work (a folder, a file that exists, a folder that cannot be
written), and a run leaves no file of an earlier one beside its own."""
from __future__ import annotations

import json
import os
from pathlib import Path

from common.checkpoint_io import atomic_write
from common.errors import UserError


def errors_path(output: Path) -> Path:
    return output.with_suffix(".errors.json")


def check_output(output: Path, overwrite: bool, flag: str = "--output") -> None:
    """Before any work: `output` can be written, and replaces nothing unless `overwrite`."""
    if output.is_dir():
        raise UserError(f"{flag} {output} is a folder; name a .json file, e.g. {output / 'predictions.json'}")
    if output.exists() and not overwrite:
        raise UserError(f"{flag} {output} already exists; pass --overwrite to replace it, or choose another path")
    folder = next((p for p in (output.parent, *output.parent.parents) if p.exists()), Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {output} cannot be written: {folder} is not a folder this user may write in; "
                        f"choose another path")


def write_results(output: Path, results: dict, failed: dict) -> None:
    """The results, and the unreadable inputs in `<output>.errors.json` (an earlier run's is removed
    when this one has none)."""
    text = json.dumps(results, indent=1)
    atomic_write(output, lambda tmp: Path(tmp).write_text(text))
    if failed:
        errors = json.dumps(failed, indent=1)
        atomic_write(errors_path(output), lambda tmp: Path(tmp).write_text(errors))
    elif errors_path(output).is_file():
        errors_path(output).unlink()


def reason(err: Exception) -> str:
    """One line saying why an input could not be read."""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
