"""Command-line options declared once, on the dataclasses they fill.

A settings dataclass declares each field with :func:`option` (default, help, choices); the CLI turns
the fields into ``argparse`` options with :func:`add_options` and builds the dataclass back from the
parsed arguments with :func:`build`, so its ``__post_init__`` validates the values (before any
model loads). A field name shared by two dataclasses of one command is one option filling both.

    @dataclass
    class MySettings:
        steps: int = option(10, "training steps")
        mode: str = option("fast", "how to run", choices=("fast", "exact"))

    add_options(parser, MySettings)         # --steps STEPS, --mode {fast,exact}, with help and defaults
    settings = build(MySettings, parser.parse_args())

An optional field (``int | None``) whose default is a value takes ``off`` for None on the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

__all__ = ["option", "add_options", "build", "flag_of", "declared_names"]

_FIELDS_ATTRIBUTE = "_cnl_option_fields"  # on a parser: {dataclass: names of its fields declared there}


def option(default=dataclasses.MISSING, help: str = "", *, choices=None, flag: str | None = None,
           metavar: str | None = None, default_factory=dataclasses.MISSING, cli: bool = True, append: bool = False,
           deprecated: tuple = ()):
    """A dataclass field that is also a command-line option.

    ``choices``: a sequence, or a function returning one (called when the parser is built, so a
    list owned by another module is read at use). ``flag``: the option's name when not
    ``--field-name`` (a ``True``-default bool gets ``--no-field-name``). ``cli=False``: not an option.
    ``append``: a list given one value per repeated flag (``--task a --task b``) instead of several after one.
    ``deprecated``: old spellings of the flag, still accepted with a warning (and not in the help).
    """
    metadata = dict(help=help, choices=choices, flag=flag, metavar=metavar, cli=cli, append=append,
                    deprecated=tuple(deprecated))
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field, default=dataclasses.MISSING) -> str:
    """The option's name; a bool whose default (``default``, else the field's) is True is ``--no-...``."""
    flag = field.metadata.get("flag")
    if flag:
        return flag
    name = field.name.replace("_", "-")
    default = field.default if default is dataclasses.MISSING else default
    return f"--no-{name}" if field.type in (bool, "bool") and default is True else f"--{name}"


OFF = "off"  # on the command line, None for an optional option whose default is a value


def _off_or(kind):
    """argparse ``type`` of an optional option with a value as default: ``off`` gives None."""

    def parse(text: str):
        return None if text == OFF else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def _unwrap_optional(hint):
    """``int | None`` -> ``int``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _argparse_kwargs(field, hint, default):
    meta = field.metadata
    help_text = meta.get("help", "")
    kwargs = {}
    value_hint = _unwrap_optional(hint)
    can_be_off = value_hint is not hint and default not in (None, dataclasses.MISSING)  # X | None with a value
    hint = value_hint
    origin = typing.get_origin(hint)
    if hint is bool:
        kwargs["action"] = "store_false" if default is True else "store_true"
        return kwargs, help_text
    if origin in (tuple, list) and meta.get("append"):
        args = typing.get_args(hint)
        kwargs.update(action="append", type=args[0] if args else str)
    elif origin in (tuple, list):
        args = typing.get_args(hint)
        fixed = origin is tuple and args and Ellipsis not in args  # tuple[float, float]: exactly two values
        kwargs["nargs"] = len(args) if fixed else "+"
        kwargs["type"] = args[0] if args else str
    else:
        kwargs["type"] = hint if hint in (int, float, str, Path) else str
    choices = meta.get("choices")
    if callable(choices):
        choices = choices()
    if choices is not None:
        kwargs["choices"] = list(choices)
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    elif "choices" not in kwargs:
        kwargs["metavar"] = {int: "N", float: "X", Path: "PATH"}.get(kwargs["type"], field.name.upper())
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
        if default is not None and default != () and default != []:
            shown = " ".join(map(str, default)) if isinstance(default, (tuple, list)) else default
            help_text = f"{help_text} (default: {shown})" if help_text else f"default: {shown}"
    if can_be_off and "nargs" not in kwargs and "choices" not in kwargs:
        kwargs["type"] = _off_or(kwargs["type"])
        kwargs["metavar"] = f"{kwargs['metavar']}|{OFF}"
    return kwargs, help_text


def add_options(parser: argparse.ArgumentParser, cls, *, only=None, skip=(), defaults: dict | None = None,
                title: str | None = None) -> None:
    """Declare ``cls``'s fields (all, ``only`` these, or all but ``skip``) as options of ``parser``.

    ``defaults``: other defaults for this command (the dataclass keeps its own). A field whose name
    an earlier dataclass of this parser declared is not declared again; both are filled from it.
    """
    declared = parser.__dict__.setdefault(_FIELDS_ATTRIBUTE, {})
    taken = {name for names in declared.values() for name in names}
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    names = []
    group = None
    for field in dataclasses.fields(cls):
        if not field.metadata.get("cli", True) or field.name in skip or (only is not None and field.name not in only):
            continue
        names.append(field.name)
        if field.name in taken:
            continue
        if group is None:
            group = parser.add_argument_group(title or (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip("."))
        default = defaults.get(field.name, field.default if field.default is not dataclasses.MISSING
                               else field.default_factory() if field.default_factory is not dataclasses.MISSING
                               else dataclasses.MISSING)
        kwargs, help_text = _argparse_kwargs(field, hints[field.name], default)
        flag = flag_of(field, default)
        group.add_argument(flag, dest=field.name, help=help_text, **kwargs)
        for old in field.metadata.get("deprecated", ()):
            action = parser._registry_get("action", kwargs.get("action"), kwargs.get("action"))
            # default None: never used, argparse keeps the default of the flag declared first
            old_kwargs = dict(kwargs, action=_deprecated_spelling(action, flag), default=None, required=False)
            group.add_argument(old, dest=field.name, help=argparse.SUPPRESS, **old_kwargs)
    unknown = (set(only or ()) | set(skip)) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"add_options: {cls.__name__} has no option fields {sorted(unknown)}")
    declared[cls] = names


def _deprecated_spelling(action: type, flag: str) -> type:
    """``action`` that first warns that its option is an old spelling of ``flag``."""

    class DeprecatedSpelling(action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {option_string} is deprecated; use {flag}", file=sys.stderr)
            super().__call__(parser, namespace, values, option_string)

    return DeprecatedSpelling


def build(cls, args: argparse.Namespace, parser: argparse.ArgumentParser):
    """An instance of ``cls`` from the parsed ``args`` (fields not declared keep their defaults)."""
    names = parser.__dict__.get(_FIELDS_ATTRIBUTE, {}).get(cls, ())
    values = {}
    for name in names:
        value = getattr(args, name)
        values[name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def declared_names(parser: argparse.ArgumentParser, cls) -> tuple:
    """The fields of ``cls`` that are options of ``parser``."""
    return tuple(parser.__dict__.get(_FIELDS_ATTRIBUTE, {}).get(cls, ()))
