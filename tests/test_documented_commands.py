"""Every command the README and docs/ show runs a script that exists and passes only flags that
script declares: a moved script (util/ -> experiments/) or a renamed flag breaks this test, not a
reader's first try. Each script's --help is read in this process (no subprocess per script)."""
from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(?:bash|sh|shell)?\n(.*?)```", re.S)
LAUNCHERS = ("python", "python3", "torchrun")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(page, script, its flags) for each `python X.py ...` / `torchrun ... X.py ...` in a code block."""
    found = []
    for page in PAGES:
        for block in BLOCK.findall(page.read_text()):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                line = line.split(" #")[0]
                for part in re.split(r"&&|;|\|", line):
                    try:
                        words = shlex.split(part)
                    except ValueError:
                        continue
                    if not words or words[0] not in LAUNCHERS and not words[0].endswith("python"):
                        continue
                    scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
                    if not scripts:
                        continue
                    at = scripts[0]
                    flags = [w.split("=")[0] for w in words[at + 1:] if w.startswith("--")]
                    found.append((page.name, words[at], flags))
    return found


@cache
def help_text(script: str) -> str:
    path = ROOT / script
    out, argv = io.StringIO(), sys.argv
    sys.argv = [str(path), "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = argv
    return out.getvalue()


COMMANDS = documented_commands()


def test_the_pages_show_commands():
    scripts = {script for _, script, _ in COMMANDS}
    assert {"main_pretrain_cook.py", "main_finetune.py", "experiments/continual_benchmark.py"} <= scripts


@pytest.mark.parametrize("script", sorted({script for _, script, _ in COMMANDS}))
def test_every_documented_command_names_an_existing_script_and_its_own_flags(script):
    assert (ROOT / script).is_file(), f"{script}, shown in {[p for p, s, _ in COMMANDS if s == script]}, does not exist"
    declared = set(re.findall(r"--[A-Za-z0-9_\-]+", help_text(script)))
    unknown = sorted({(page, flag) for page, s, flags in COMMANDS if s == script for flag in flags
                      if flag not in declared})
    assert not unknown, f"{script} does not declare {unknown}"
