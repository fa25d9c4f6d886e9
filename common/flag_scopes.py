"""Where a flag means something, declared once beside the flag (`flag(..., scope=...)`) and checked
once for every run (`check_scopes`): a flag given where nothing reads it is refused in one sentence
instead of being ignored and recorded in args.yaml as if it had mattered.

A scope is a test on the frozen run config. The pretraining modes and the continual-learning
methods declare what they read (`PretrainMode.reads`: parts such as "masking" or "visual_tokens";
`ContinualMethod.reads`: its own flags), so a flag of another mode or method is refused by asking the
run's own mode and method, and a new mode or method says what it reads in one place."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from common.errors import UserError


@dataclass(frozen=True)
class Scope:
    """`applies(cfg)`: whether the flag means something in this run; `where(cfg)`: where it does, in
    words that end the refusal ("--cl_method wise, and this run's is l2"); `fix`: what to do."""

    applies: Callable[[Any], bool]
    where: Callable[[Any], str]
    fix: str = "drop it"


def when(words: str, applies: Callable[[Any], bool], fix: str = "drop it") -> Scope:
    """A scope given by a test on the config."""
    return Scope(applies, lambda cfg: words, fix)


def mode_reads(part: str) -> Scope:
    """Read by the modes whose `reads` hold `part` (the registry answers which those are)."""
    def where(cfg) -> str:
        modes = sorted(name for name, mode in cfg.mode_registry.items() if part in mode.reads)
        return f"--exp_name {' / '.join(modes)}, and this run's is {cfg.exp_name}"

    return Scope(lambda cfg: part in cfg.mode.reads, where)


def method_reads(name: str) -> Scope:
    """Read by the continual-learning methods whose `reads` hold the flag `name`."""
    def where(cfg) -> str:
        methods = sorted(m for m, method in cfg.method_registry.items() if name in method.reads)
        return f"--cl_method {' / '.join(methods)}, and this run's is {cfg.continual.cl_method}"

    return Scope(lambda cfg: name in cfg.method.reads, where)


def both(first: Scope, second: Scope) -> Scope:
    """Where both apply; a refusal names the first that does not."""
    return Scope(lambda cfg: first.applies(cfg) and second.applies(cfg),
                 lambda cfg: (second if first.applies(cfg) else first).where(cfg), second.fix)


# ---- which flags a user gave -----------------------------------------------------------------------
COMMAND_LINE = "command line"
_UNSET = object()


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None, config_keys: list[str],
                config: str | None) -> dict[str, str]:
    """{flag dest: where it was given}: on the command line, or in the `--config` file. argparse
    fills a default only for a dest the namespace lacks, so a namespace holding a marker for every
    dest comes back with the marker exactly where no flag was given."""
    marked = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != "help"})
    seen, _ = parser.parse_known_args(argv, namespace=marked)
    given = {key: f"--config {config}" for key in config_keys}
    given.update({dest: COMMAND_LINE for dest, value in vars(seen).items() if value is not _UNSET})
    return given


def check_scopes(cfg: Any, groups: dict[str, type], given: dict[str, str]) -> None:
    """Refuses a flag given where its scope says nothing reads it: any flag on the command line, and a
    `--config` value that differs from the flag's default (a config file, such as a run's args.yaml,
    may hold every flag)."""
    for group in groups:
        settings = getattr(cfg, group)
        for field in dataclasses.fields(settings):
            scope = field.metadata.get("scope")
            source = given.get(field.name)
            if scope is None or source is None or scope.applies(cfg):
                continue
            if source != COMMAND_LINE and getattr(settings, field.name) == _default(field):
                continue
            by = "" if source == COMMAND_LINE else f" (in {source})"
            raise UserError(f"--{field.name}{by} is read only by {scope.where(cfg)}: nothing in this run reads it; "
                            f"{scope.fix}")


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]
