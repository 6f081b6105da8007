"""Typed `get_config(arg)` arguments, big_vision style: 'model=base,tower=bridge' -> ConfigDict.

Each argument's type is its default's type; unknown names, malformed pairs and values outside
the allowed choices are ValueErrors that name the argument and what it accepts.
"""
from __future__ import annotations

from typing import Any, Sequence

import ml_collections


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
