"""Dataclass fields that are command-line options: one place for a parameter's default and its help.

The ``hamil`` command line (``hamil/cli.py``) turns every field of a stage's parameter dataclasses into an
option whose help text is ``metadata["help"]`` and whose default is shown beside it; the same text
documents the config keys of the same names. :func:`options_of` builds a source's options dataclass
from a JSON object (``--options``), checking names and value types.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from preprocessing.errors import InputError


def opt(default: Any = dataclasses.MISSING, help: str = "", **extra: Any) -> Any:  # noqa: A002
    """A dataclass field with its default (none: required) and a one-line ``help``.

    ``extra`` goes to the metadata: ``choices`` (allowed values), ``positional`` (an argument, not an option),
    ``nargs`` (the command line's number of values, when not the type's: ``"*"`` allows none).
    """
    metadata = {"help": help, **extra}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def options_of(cls: type, values: dict[str, Any]) -> Any:
    """A source's options dataclass from the ``--options`` object; unknown keys are named; lists become
    tuples, strings become paths where the field is a path."""
    values = dict(values)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(
            f"unknown {cls.__name__} option(s): {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not _fits(value, hints[key]):
            raise InputError(
                f"{cls.__name__} option {key}: expected {_type_name(hints[key])}, got {json.dumps(value)}"
            )
        if isinstance(value, list):
            values[key] = tuple(value)
        elif isinstance(value, str) and Path in typing.get_args(hints[key]):
            values[key] = Path(value)
    return cls(**values)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON ``value`` can be the option of type ``hint`` (a path is given as a string)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin in (tuple, list):
        items = [a for a in args if a is not Ellipsis] or [Any]
        return isinstance(value, list) and all(_fits(v, items[0]) for v in value)
    simple = {
        type(None): value is None,
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
        Path: isinstance(value, str),
    }
    return simple.get(hint, True)


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(hint) in (tuple, list):
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    names = {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, "a path" if hint is Path else getattr(hint, "__name__", str(hint)))
