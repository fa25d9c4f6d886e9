"""The command lines of the two entry scripts, built from the settings dataclasses (one flag per
field, with its help and default), and the frozen configs they produce. Scripts and tests that want
a run from flags call `pretrain_config_from_argv` / `finetune_config_from_argv`."""
from __future__ import annotations

import argparse

from common.config_args import add_flags, parse_with_config
from common.console import say
from common.errors import UserError
from models.downstream import DOWNSTREAM_TASKS
from models.modes import MODE_ALIASES, PRETRAIN_MODES
from training.config import (
    FINETUNE_GROUPS,
    PRETRAIN_GROUPS,
    FinetuneConfig,
    PretrainConfig,
    finetune_config,
    pretrain_config,
)
from training.presets import PRESETS
from training.recipes import RECIPE_TASKS, RECIPES, chosen_recipe


def pretrain_parser(description: str = "") -> argparse.ArgumentParser:
    modes = "; ".join(f"{name}: {cls.description}" for name, cls in PRETRAIN_MODES.items())
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of flag values; explicit flags override it (default: none)")
    aliases = "; ".join(f"{alias}: {text}" for alias, (_, text) in MODE_ALIASES.items())
    p.add_argument("--exp_name", choices=sorted(PRETRAIN_MODES) + list(MODE_ALIASES), default="image_mim",
                   help=f"pretraining mode: {modes}; ContinualTransformer's names: {aliases} (default: image_mim)")
    for title, settings in PRETRAIN_GROUPS.values():
        add_flags(p.add_argument_group(title), settings)
    return p


def finetune_parser(description: str = "") -> argparse.ArgumentParser:
    tasks = "; ".join(f"{name}: {cls.description}" for name, cls in DOWNSTREAM_TASKS.items())
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of flag values; explicit flags override it (default: none)")
    p.add_argument("--task", choices=list(DOWNSTREAM_TASKS), required=True, help=f"the downstream task: {tasks}")
    for title, settings in FINETUNE_GROUPS.values():
        add_flags(p.add_argument_group(title), settings)
    return p


def mode_defaults(argv: list[str] | None) -> dict:
    """The flag defaults of the mode's own recipe (`PretrainMode.flag_defaults`), by --exp_name as the
    command line or its --config give it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--exp_name", default=None)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    name = known.exp_name
    if name is None and known.config:
        import yaml
        from pathlib import Path

        try:
            values = yaml.safe_load(Path(known.config).read_text()) or {}
            name = values.get("exp_name") if isinstance(values, dict) else None
        except (OSError, yaml.YAMLError):
            name = None  # parse_with_config says what is wrong with the file
    name = MODE_ALIASES.get(name, (name,))[0] if name else "image_mim"
    return dict(PRETRAIN_MODES[name].flag_defaults) if name in PRETRAIN_MODES else {}


def pretrain_config_from_argv(argv: list[str] | None, description: str = "", recorded: bool = False) -> PretrainConfig:
    """`recorded`: the settings a run recorded (its args.yaml as --config), read back as they were:
    no flag of them is refused for its scope."""
    namespace = parse_with_config(pretrain_parser(description), argv, PRESETS, defaults=mode_defaults(argv))
    return pretrain_config(namespace, check_scopes_too=not recorded)


def _refusing(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser, its errors a UserError instead of an exit (for checking a command before it runs)."""
    def refuse(message: str):
        raise UserError(message)

    parser.error = refuse  # type: ignore[method-assign]
    return parser


def check_planned_pretrain_run(argv: list[str], planned: frozenset[str] = frozenset()) -> None:
    """Validates a main_pretrain_cook.py command an experiment will run later, as that run would
    before any work, without printing: a bad flag value or combination is a UserError now (not an
    argparse exit), and input paths in `planned` (written by the experiment's earlier steps) may not
    exist yet."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        pretrain_config(parse_with_config(_refusing(pretrain_parser()), argv, PRESETS, defaults=mode_defaults(argv)),
                        planned, fetch=False)


def check_planned_finetune_run(argv: list[str]) -> None:
    """The same for a main_finetune.py command (its recipe chosen as the run will)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        parse_with_config(_refusing(finetune_parser()), argv)  # argparse's refusals, as sentences
        finetune_config_from_argv(argv)


def finetune_config_from_argv(argv: list[str] | None, description: str = "") -> FinetuneConfig:
    """Flags over `--config` over the recipe's defaults (`auto`: chosen by the training set's size)."""
    namespace = parse_with_config(finetune_parser(description), argv)
    if namespace.recipe != "auto" and namespace.task not in RECIPE_TASKS:
        raise UserError(f"--recipe applies to --task {' / '.join(RECIPE_TASKS)}; leave it out for --task "
                        f"{namespace.task}")
    recipe, why = chosen_recipe(namespace)
    defaults = RECIPES.get(namespace.task, {}).get(recipe, {})
    if defaults:
        namespace = parse_with_config(finetune_parser(description), argv, defaults=defaults)
        say(f"recipe {recipe} ({why}): " + ", ".join(f"{k} {v!r}" for k, v in defaults.items())
            + "; explicit flags win, --recipe beit for BEiT's ImageNet recipe")
    namespace.recipe = recipe
    return finetune_config(namespace)
