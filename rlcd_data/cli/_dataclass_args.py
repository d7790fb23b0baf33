"""Command-line flags from a config dataclass: help text from field metadata, `--config` YAML defaults."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from ..config import read_config_file


def _base_type(annotation) -> type:
    hint = annotation
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_class: type, positional: tuple[str, ...] = ()) -> None:
    """One flag per field (``--max-new-tokens``); fields in ``positional`` become optional positionals.

    Only options given on the command line end up in the namespace (argparse.SUPPRESS),
    so `config_from_args` can layer them over a `--config` file.
    """
    hints = typing.get_type_hints(config_class)
    parser.add_argument("--config", metavar="FILE.yaml", help="Read options from a YAML file; flags win.")
    for f in dataclasses.fields(config_class):
        kind = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING and f.default is not None and kind is not bool:
            help_text += f" (default: {f.default})"
        common = {"help": help_text, "default": argparse.SUPPRESS}
        if f.name in positional:
            parser.add_argument(f.name, nargs="?", metavar=f.name.upper(), **common)
        elif kind is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), action="store_true", **common)
        else:
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                type=kind,
                choices=f.metadata.get("choices"),
                metavar=None if f.metadata.get("choices") else f.name.upper(),
                **common,
            )


def config_from_args(args: argparse.Namespace, config_class: type):
    """Dataclass defaults, then the `--config` file, then command-line flags."""
    names = {f.name for f in dataclasses.fields(config_class)}
    values = read_config_file(args.config, config_class) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items() if k in names})
    missing = [f.name for f in dataclasses.fields(config_class)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        from ..errors import RlcdError

        raise RlcdError(f"missing {', '.join(missing)} (give it on the command line or in --config)")
    return config_class(**values)
