"""Typed `get_config(arg)` arguments, big_vision style: 'model=base,tower=bridge' -> ConfigDict,
and the type check of command-line overrides (`--config.batch_size=64`) against the config.

Each argument's type is its default's type; unknown names, malformed pairs and values outside
the allowed choices are ValueErrors that name the argument and what it accepts.

Config files are Python that runs in the process (only use ones you trust); what comes from
the command line is data: `parse_flags` (main.py's flags parser) checks every override
against the locked config before absl applies any, so that a typo or a wrong type fails at
once, naming the key, the value and the expected type (ml_collections alone lets a tuple of
ints replace a tuple of strings, or a dict replace a whole sub-config, and reports an
unknown key as a bare AttributeError).
"""
from __future__ import annotations

import difflib
import re
import sys
from typing import Any, Sequence

import ml_collections
from absl import app, flags
from ml_collections.config_flags import tuple_parser


def _convert(name: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"config argument {name}={text!r} is not a boolean")
        return lowered in ("true", "1", "yes")
    try:
        return type(default)(text)
    except (TypeError, ValueError):
        raise ValueError(f"config argument {name}={text!r} is not a {type(default).__name__}") \
            from None


def parse_arg(arg: str | None, choices: dict[str, Sequence[Any]] | None = None,
              **defaults: Any) -> ml_collections.ConfigDict:
    """Parses 'k1=v1,k2=v2' against `defaults` (which fix names and types)."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"config argument {item!r} is not of the form name=value; "
                             f"arguments: {sorted(defaults)}")
        if name not in defaults:
            raise ValueError(f"unknown config argument {name!r}; arguments: {sorted(defaults)}")
        values[name] = _convert(name, text.strip(), defaults[name])
    for name, allowed in (choices or {}).items():
        if values[name] not in allowed:
            raise ValueError(f"config argument {name}={values[name]!r} is not one of "
                             f"{tuple(allowed)}")
    return ml_collections.ConfigDict(values)


# The parser absl / ml_collections use for an override of a field of each type.
_PARSERS = {bool: flags.BooleanParser(), int: flags.IntegerParser(), float: flags.FloatParser(),
            tuple: tuple_parser.TupleParser()}


def parse_flags(argv: list[str]) -> list[str]:
    """main.py's flags parser (`app.run(main, flags_parser=parse_flags)`): the overrides
    checked (`check_overrides`), then absl's own parsing; an error exits with status 1."""
    try:
        check_overrides(argv, flags.FLAGS)
    except flags.Error as e:
        sys.stderr.write(f"FATAL Flags parsing error: {e}\n")
        sys.exit(1)
    return app.parse_flags_with_usage(argv)


def check_overrides(argv: list[str], flag_values: flags.FlagValues,
                    name: str = "config") -> None:
    """Checks each --NAME.KEY=VALUE override in argv against a fresh copy of the config
    (loaded by the config flag's own parser) before absl applies any: a flags.Error naming
    the key, the value and the expected type. A config file that fails to load is left to
    absl's parsing to report."""
    overrides = _overrides(argv, name)
    config_arg = next((v for k, v in _flag_args(argv) if k == name and v is not None), None)
    if not overrides or config_arg is None:
        return
    try:
        config = flag_values[name].parser.parse(config_arg)
    except Exception:  # noqa: BLE001 - absl's parse of the same argument reports it
        return
    if isinstance(config, ml_collections.ConfigDict):
        for path, text in overrides:
            check_override(config, path, text, name)


def check_override(config: ml_collections.ConfigDict, path: str, text: str | None,
                   name: str = "config") -> None:
    """A flags.Error unless `text` (None: a bare --NAME.KEY) is a valid value of the config
    field at dotted `path`: the key exists, a sub-config is not replaced whole, the value
    parses as the field's type (a tuple's items as the default's items)."""
    flag = f"--{name}.{path}" + ("" if text is None else f"={text}")
    node, where = config, name
    if "[" in path:  # indexing (a[0]): left to ml_collections
        return
    for key in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            raise flags.Error(f"{flag}: {where} is {_a(type(node))}, it has no key {key!r}")
        if key not in node:
            near = difflib.get_close_matches(key, list(node.keys()), n=1)
            raise flags.Error(f"{flag}: {where} has no key {key!r}"
                              + (f" (did you mean {near[0]!r}?)" if near else "")
                              + f"; its keys: {', '.join(sorted(node.keys()))}")
        node, where = node[key], f"{where}.{key}"
    if isinstance(node, ml_collections.ConfigDict):
        raise flags.Error(f"{flag}: {where} is a sub-config; set its fields one by one "
                          f"(--{where}.KEY=VALUE): {', '.join(sorted(node.keys()))}")
    kind = type(node)
    if kind not in _PARSERS:  # str accepts any text; None-valued fields take a literal
        return
    expected = _a(kind) + (", true or false" if kind is bool else "")
    if text is None:
        if kind is bool:
            return
        raise flags.Error(f"{flag}: needs a value, {expected} ({where} is {node!r})")
    try:
        value = _PARSERS[kind].parse(text)
    except ValueError:
        raise flags.Error(f"{flag}: expected {expected} ({where} is {node!r}), got "
                          f"{text!r}") from None
    item_types = {type(item) for item in node} if kind is tuple else set()
    if len(item_types) == 1:  # a tuple of one type: its items keep that type
        item_type = item_types.pop()
        bad = [item for item in value if type(item) is not item_type
               and not (item_type is float and type(item) is int)]
        if bad:
            raise flags.Error(f"{flag}: expected a tuple of {item_type.__name__} ({where} is "
                              f"{node!r}), got {value!r}: {bad[0]!r} is {_a(type(bad[0]))}")


def _a(kind: type) -> str:
    return ("an " if kind.__name__[0] in "aeiou" else "a ") + kind.__name__


def _flag_args(argv: list[str]) -> list[tuple[str, str | None]]:
    """(flag name, its value or None) of each --flag[=value] / --flag value in argv, as absl
    reads them (a value after a space belongs to the flag unless it looks like a flag)."""
    out, i = [], 1
    while i < len(argv):
        match = re.match(r"^--?([^=]+)(?:=(.*))?$", argv[i], re.S)
        if argv[i] == "--":
            break
        if match:
            value = match.group(2)
            if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                value, i = argv[i + 1], i + 1
            out.append((match.group(1), value))
        i += 1
    return out


def _overrides(argv: list[str], name: str) -> list[tuple[str, str | None]]:
    """[(dotted key, text or None)] of the --NAME.KEY overrides in argv (--noNAME.KEY: 'false')."""
    out = []
    for flag, value in _flag_args(argv):
        if flag.startswith(f"no{name}.") and value is None:
            out.append((flag[len(name) + 3:], "false"))
        elif flag.startswith(f"{name}."):
            out.append((flag[len(name) + 1:], value))
    return out
