"""hamil <stage>: one subcommand per stage of the HAMIL pipeline (hamil <stage> --help for its options).

Bad input ends with one line on stderr and exit status 2; any other error is a bug and shows its traceback
(-v shows it for bad input too). The subcommands are built from the table in hamil/stages.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from hamil.errors import TrainingDiverged
from hamil.stages import STAGES
from preprocessing.errors import InputError

log = logging.getLogger("hamil")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hamil`` command: one subcommand per stage, one option per field."""
    parser = argparse.ArgumentParser(prog="hamil", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, stage in STAGES.items():
        text = stage.help.replace("%", "%%")  # argparse formats help with %: a literal one is doubled
        p = sub.add_parser(name, help=text, description=text)
        for cls in stage.params:
            _add_options(p, cls)
        p.set_defaults(stage=stage)
    return parser


def _add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--field-name`` option per dataclass field, typed from its annotation."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        kind, nargs = _arg_type(hints[f.name])
        nargs = f.metadata.get("nargs", nargs)  # e.g. "*": an option that may be given with no value
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata.get("help", "")
        if not required and default not in (None, ""):
            text = f"{text} (default: {_show(default)})".strip()
        elif not required and default is None and "(default" not in text:
            text = f"{text} (default: none)".strip()
        text = text.replace("%", "%%")  # argparse formats help with %: a literal one is doubled
        choices = f.metadata.get("choices")
        if f.metadata.get("positional"):
            group.add_argument(f.name, choices=choices, nargs=nargs, help=text)
        elif kind is bool:
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=text,
            )
        else:
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                type=kind,
                nargs=nargs,
                choices=choices,
                required=required,
                default=argparse.SUPPRESS,
                metavar=f.name.upper() if choices is None else None,
                help=text,
                dest=f.name,
            )


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _arg_type(hint: Any) -> tuple[Callable[[str], Any], str | None]:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kind, nargs = _arg_type(args[0])
        if type(None) in typing.get_args(hint) and kind is not bool:
            return _or_none(kind), nargs  # "none" on the command line gives None
        return kind, nargs
    if typing.get_origin(hint) in (tuple, list):
        item, _ = _arg_type(args[0])  # e.g. str | int: the first type parses each value
        return item, "*" if typing.get_origin(hint) is list else "+"
    if typing.get_origin(hint) is dict:
        return str, None  # a JSON object, parsed by json_object when the dataclass is built
    return hint, None


def json_object(text: str, flag: str) -> dict[str, Any]:
    """A JSON object given on the command line as ``flag`` (``{"depth": 2}``); anything else is one line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{flag} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise InputError(f'{flag} must be a JSON object, e.g. {{"name": 1}}')
    return value


def _or_none(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in its errors
    return parse


def _instance(cls: type, args: argparse.Namespace) -> Any:
    """``cls`` built from the parsed options that are its fields (lists become tuples where it says so)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            origin = typing.get_origin(hints[f.name])
            if isinstance(value, list) and value and all(v is None for v in value):
                value = None  # `--whole-size none`: the option's None, not a list holding None
            elif isinstance(value, list) and origin is not list:
                value = tuple(value)
            elif isinstance(value, str) and origin is dict:
                value = json_object(value, "--" + f.name.replace("_", "-"))
            values[f.name] = value
    return cls(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hamil`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        params = [_instance(cls, args) for cls in args.stage.params]
        args.stage.run(*params)
    except (InputError, TrainingDiverged) as err:
        if args.verbose:
            raise
        print(f"hamil {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: outputs are written under temp names, so nothing is half-written
        print(f"hamil {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
