"""Option dataclasses own their defaults; the command line is derived from them.

A field made with ``option(default, "help")`` becomes one argparse option (``--field-name``,
or ``flag``), typed from the field's annotation (int, float, str; a tuple or list of str is
given comma-separated; ``X | None`` may be left out), its help text ending with the
dataclass's default. Booleans become switches: ``--name`` where the default is False,
``--no-name`` where it is True. A nested option dataclass contributes its fields. An option
not given on the command line is not set on the namespace, so ``from_args`` leaves it to the
dataclass: every default is written once, in the dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 - argparse's own name for it
    *,
    flag: str | None = None,
    choices: tuple | None = None,
    metavar: str | None = None,
    default_text: str | None = None,
    default_factory: Any = dataclasses.MISSING,
    parse: Any = None,
    negatable: bool = False,
) -> Any:
    """A dataclass field that is also a command-line option (see the module docstring);
    ``default_text`` replaces the default in the help (e.g. where None means "chosen by
    the model"); ``parse`` turns the command-line text into the value where the type alone
    does not say how (e.g. split ratios that must sum to 1); ``negatable``: a boolean gets both
    ``--name`` and ``--no-name``."""
    meta = {
        "help": help,
        "flag": flag,
        "choices": choices,
        "metavar": metavar,
        "default_text": default_text,
        "parse": parse,
        "negatable": negatable,
        "cli": True,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def _inner(hint) -> tuple[Any, bool]:
    """``(type without None, whether None is allowed)``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _comma_list(kind):
    def parse(text: str):
        return kind(x.strip() for x in text.split(",") if x.strip())

    return parse


def _parser_of(hint):
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return _comma_list(origin)
    if hint in (int, float, str):
        return hint
    raise TypeError(f"no command-line type for {hint!r}")


def _explained(parse):
    """``parse`` whose ValueError reaches the user as argparse's error, its message kept."""

    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    wrapped.__name__ = parse.__name__
    return wrapped


def _shown(value) -> str:
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(value)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add an option for each ``option`` field of ``cls`` (and of nested option classes)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, _ = _inner(hints[f.name])
        if dataclasses.is_dataclass(hint):
            add_arguments(parser, hint)
            continue
        meta = f.metadata
        if not meta.get("cli"):
            continue
        default = _default(f)
        name = f.name.replace("_", "-")
        help_text = meta["help"].replace("%", "%%")
        if hint is bool and meta.get("negatable"):
            parser.add_argument(
                f"--{name}",
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: --{'' if default else 'no-'}{name})",
            )
            continue
        if hint is bool:
            flag = meta["flag"] or (f"--no-{name}" if default else f"--{name}")
            action = "store_false" if default else "store_true"
            parser.add_argument(
                flag, dest=f.name, action=action, default=argparse.SUPPRESS, help=help_text
            )
            continue
        shown = meta["default_text"] or ("" if default is None else _shown(default))
        kwargs = {"help": f"{help_text} (default: {shown})" if shown else help_text}
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        flag = meta["flag"] or f"--{name}"
        parse = _explained(meta["parse"]) if meta.get("parse") else _parser_of(hint)
        parser.add_argument(flag, dest=f.name, type=parse, default=argparse.SUPPRESS, **kwargs)


def from_args(cls, args: argparse.Namespace):
    """An instance of ``cls`` from the options given on the command line; the others keep
    the dataclass's defaults."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        hint, _ = _inner(hints[f.name])
        if dataclasses.is_dataclass(hint):
            values[f.name] = from_args(hint, args)
        elif f.metadata.get("cli") and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)
