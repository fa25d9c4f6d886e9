"""Flags from dataclasses: each field of a settings dataclass is one command-line flag (same name,
default, help text, choices), so a flag, its default and the typed config field can never drift
apart. `--config FILE.yaml` supplies defaults that explicit flags override; the effective settings
are saved as YAML in the output dir."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from common.errors import UserError
from common.flag_scopes import given_flags
from common.url_secrets import masked_url

_NO_DEFAULT_SHOWN = object()


def flag(default: Any, help: str, *aliases: str, default_factory: Callable[[], Any] | None = None,
         shown_default: Any = _NO_DEFAULT_SHOWN, minimum: float | None = None, below: float | None = None,
         maximum: float | None = None, scope: Any = None, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a flag. `aliases`: other spellings accepted on the command
    line (e.g. ContinualTransformer's names); `shown_default`: what the help prints when the real
    default is computed later (e.g. "the checkpoint's"); `minimum` / `below`: the range a number
    must lie in (at least `minimum`, less than `below`, at most `maximum`), checked as the flag's value
    is read; `scope` (common/flag_scopes.py): the runs it means something in (None: every run)."""
    meta = {"help": help, "aliases": aliases, "argparse": argparse_kwargs, "shown_default": shown_default,
            "range": (minimum, below, maximum), "scope": scope}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int, `tuple[str, ...]` -> str, `bool` -> bool."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin in (tuple, list):
        return _base_type(typing.get_args(annotation)[0])
    return annotation


def _help(field: dataclasses.Field, default: Any) -> str:
    shown = field.metadata["shown_default"]
    shown = default if shown is _NO_DEFAULT_SHOWN else shown
    if isinstance(shown, bool):
        shown = "on" if shown else "off"
    elif isinstance(shown, (list, tuple)):
        shown = " ".join(map(str, shown)) or "none"
    elif shown is None:
        shown = "none"
    return f"{field.metadata['help']} (default: {shown})".replace("%", "%%")


def in_range(base: Callable[[str], Any], minimum: float | None, below: float | None,
             maximum: float | None = None) -> Callable[[str], Any]:
    """`base` (int, float) that also refuses nan and values outside [minimum, below) or above `maximum`."""
    def convert(text: str) -> Any:
        value = base(text)
        if value != value:  # nan compares false with every bound
            raise argparse.ArgumentTypeError(f"{text} is not a number")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is not allowed: it must be at least {minimum}")
        if below is not None and not value < below:
            raise argparse.ArgumentTypeError(f"{text} is not allowed: it must be below {below}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{text} is not allowed: it must be at most {maximum}")
        return value

    convert.__name__ = base.__name__  # argparse names the type in "invalid int value: ..."
    return convert


def _allows_none(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def add_flags(group: argparse._ActionsContainer, settings: type) -> None:
    """One flag per field of the dataclass `settings`."""
    hints = typing.get_type_hints(settings)
    for field in dataclasses.fields(settings):
        if "help" not in field.metadata:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kwargs = dict(field.metadata["argparse"])
        kwargs.setdefault("default", list(default) if isinstance(default, tuple) else default)
        base = _base_type(hints[field.name])
        if base is bool and "action" not in kwargs:
            kwargs["action"] = "store_true"
        elif "action" not in kwargs and "type" not in kwargs:
            kwargs["type"] = base
        if any(bound is not None for bound in field.metadata["range"]):
            kwargs["type"] = in_range(kwargs["type"], *field.metadata["range"])
        names = [f"--{field.name}", *field.metadata["aliases"]]
        action = group.add_argument(*names, dest=field.name, help=_help(field, default), **kwargs)
        action.allows_none = _allows_none(hints[field.name])  # a --config value may be null


def settings_from(settings: type, namespace: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of the dataclass `settings` from the parsed flags (lists become tuples)."""
    values = {}
    for field in dataclasses.fields(settings):
        if field.name in overrides:
            values[field.name] = overrides[field.name]
        elif hasattr(namespace, field.name):
            value = getattr(namespace, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return settings(**values)


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None,
                      presets: dict[str, dict[str, Any]] | None = None,
                      defaults: dict[str, Any] | None = None) -> argparse.Namespace:
    """Flags over `--config` YAML over the `--preset`'s defaults over `defaults` (e.g. a recipe's)
    over the parser's own."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    config_keys: list[str] = []
    if defaults:
        parser.set_defaults(**defaults)
    if known.preset and presets and known.preset in presets:
        parser.set_defaults(**presets[known.preset])
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise UserError(f"--config {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"--config {path} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise UserError(f"--config {path} must be a mapping of flag names to values")
        actions = {a.dest: a for a in parser._actions}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            raise UserError(f"--config {path} has unknown keys {unknown}; use the flag names without dashes")
        parser.set_defaults(**{key: config_value(parser, actions[key], value, f"--config {path}: {key}")
                               for key, value in values.items()})
        config_keys = list(values)
    namespace = parser.parse_args(argv)
    namespace.given_flags = given_flags(parser, argv, config_keys, known.config)  # what flag_scopes checks
    return namespace


def _as_flag_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def config_value(parser: argparse.ArgumentParser, action: argparse.Action, value: Any, where: str) -> Any:
    """A `--config` value checked and converted exactly as the flag's value on the command line is:
    its type, range, choices and number of values."""
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
        if value is None and action.default is None:  # a three-way switch left unset (as args.yaml writes it)
            return None
        if not isinstance(value, bool):
            raise UserError(f"{where} is a switch: write true or false, not {value!r}")
        return value
    if value is None:
        if action.default is None or getattr(action, "allows_none", False):
            return None
        raise UserError(f"{where} needs a value (null is not one)")
    single = action.nargs in (None, "?")
    if single and isinstance(value, (list, dict)):
        raise UserError(f"{where} takes one value, not {value!r}")
    items = [value] if single or not isinstance(value, list) else value
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise UserError(f"{where} takes {action.nargs} values, not {len(items)} ({value!r})")
    if action.nargs == "+" and not items:
        raise UserError(f"{where} takes at least one value")
    if isinstance(value, dict) or any(isinstance(item, (list, dict)) for item in items):
        raise UserError(f"{where}: {value!r} is not a value this flag takes")
    try:
        return parser._get_values(action, [_as_flag_text(item) for item in items])
    except argparse.ArgumentError as err:
        raise UserError(f"{where}: {err.message}") from None


def plain(value: Any) -> Any:
    """Settings as plain YAML/JSON types (dataclasses become dicts, paths strings)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def flat_settings(config: Any) -> dict[str, Any]:
    """A nested settings dataclass as one flat `{flag name: value}` dict (what `args.yaml` and
    checkpoints record, so a run can be repeated with the same flags)."""
    out: dict[str, Any] = {}
    for key, value in plain(config).items():
        if isinstance(value, dict):
            out.update(value)
        else:
            out[key] = value
    return {key: _masked(value) for key, value in out.items()}


def _masked(value: Any) -> Any:
    """A URL's password or presigned query is never recorded (common/url_secrets.py)."""
    if isinstance(value, str):
        return masked_url(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_masked(v) for v in value)
    return value


def save_settings(config: Any, output_dir: str | Path, name: str = "args.yaml") -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / name).write_text(yaml.safe_dump(flat_settings(config), sort_keys=True))
