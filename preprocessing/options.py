"""Dataclass fields that are command-line options: one place for a parameter's default and its help.

The ``hamil`` command line (``hamil/cli.py``) turns every field of a stage's parameter dataclasses into an
option whose help text is ``metadata["help"]`` and whose default is shown beside it; the same text
documents the config keys of the same names.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def opt(default: Any = dataclasses.MISSING, help: str = "", **extra: Any) -> Any:  # noqa: A002
    """A dataclass field with its default (none: required) and a one-line ``help``.

    ``extra`` goes to the metadata: ``choices`` (allowed values), ``positional`` (an argument, not an option),
    ``nargs`` (the command line's number of values, when not the type's: ``"*"`` allows none).
    """
    metadata = {"help": help, **extra}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
