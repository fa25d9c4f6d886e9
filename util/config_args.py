"""argparse + optional YAML: `--config FILE` supplies defaults, explicit flags override them,
and the effective arguments are saved as YAML in the output dir."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from util.errors import UserError


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
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
        valid = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise UserError(f"--config {path} has unknown keys {unknown}; use the flag names without dashes")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def plain(value: Any) -> Any:
    """Arguments as plain YAML/JSON types (paths become strings)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def check_run_flags(args: argparse.Namespace, positive: tuple[str, ...]) -> None:
    """What every entry script checks: the device exists, sizes and counts are positive; and the
    default precision (bf16 on GPU, none on CPU)."""
    import torch

    from util.errors import UserError

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but no GPU is visible; use --device cpu")
    for flag in positive:
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    args.amp = args.amp or ("bf16" if args.device.startswith("cuda") else "none")


def save_args(args: argparse.Namespace, output_dir: str | Path, name: str = "args.yaml") -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / name).write_text(yaml.safe_dump(plain(vars(args)), sort_keys=True))
