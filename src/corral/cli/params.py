"""Options shared by commands, and parsers that turn flags into API values.

A bad value raises `typer.BadParameter` naming the option and the rule, which the CLI turns
into a usage error (exit 2) before anything is sent.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated

import typer

from corral.cli.context import OutputFormat

__all__ = [
    "LabelsOpt",
    "OutputOpt",
    "TimeoutOpt",
    "WaitOpt",
    "parse_label_keys",
    "parse_labels",
    "parse_memory",
]

OutputOpt = Annotated[
    OutputFormat | None,
    typer.Option(
        "-o",
        "--output",
        case_sensitive=False,
        help="table or json; overrides the global -o/--output for this command.",
        show_default=False,
    ),
]

WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait/--no-wait",
        help="Wait for the task to end, showing its progress (--no-wait: return at once).",
    ),
]

TimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        min=0,
        metavar="SECONDS",
        help="Stop waiting after this long (the task goes on). Default: wait until it ends.",
        show_default=False,
    ),
]

LabelsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--label",
        "-l",
        metavar="KEY=VALUE",
        help="A label to set; repeat for several.",
        show_default=False,
    ),
]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
_MIB_PER_UNIT: dict[str, Decimal] = {}
for _names, _factor in (
    (("k", "kb", "ki", "kib"), Decimal(1) / 1024),
    (("", "m", "mb", "mi", "mib"), Decimal(1)),
    (("g", "gb", "gi", "gib"), Decimal(1024)),
    (("t", "tb", "ti", "tib"), Decimal(1024 * 1024)),
):
    for _name in _names:
        _MIB_PER_UNIT[_name] = _factor

_SIZE_RULE = "give MiB (512) or a size with a unit (512M, 1G, 1.5G, 2048MiB)"


def parse_memory(value: str) -> int:
    """MiB from `512`, `512M`, `512MiB`, `1G`, `1.5G`, `1GiB`, `1T`, ... (units are binary;
    M/MB/Mi/MiB all mean MiB). BadParameter unless the result is a positive whole MiB.
    """
    match = _SIZE.match(value)
    if match is None:
        raise typer.BadParameter(f"{value!r} is not a size; {_SIZE_RULE}")
    number, unit = match.groups()
    factor = _MIB_PER_UNIT.get(unit.lower())
    if factor is None:
        raise typer.BadParameter(
            f"{value!r} has unknown unit {unit!r}; use K, M, G or T (or KiB, MiB, GiB, TiB)"
        )
    try:
        mib = Decimal(number) * factor
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise typer.BadParameter(f"{value!r} is not a size; {_SIZE_RULE}") from None
    if mib != mib.to_integral_value():
        raise typer.BadParameter(f"{value!r} is {mib.normalize():f} MiB; must be whole MiB")
    if mib <= 0:
        raise typer.BadParameter(f"{value!r} must be greater than 0")
    return int(mib)


def parse_labels(values: list[str] | None, option: str = "--label") -> dict[str, str]:
    """`["tier=web", "env=prod"]` -> `{"tier": "web", "env": "prod"}`; BadParameter for an
    item without `=` or with an empty key. A later repeat of a key wins.
    """
    labels: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=f"'{option}'")
        labels[key] = value.strip()
    return labels


def parse_label_keys(values: list[str] | None, option: str = "--remove-label") -> list[str]:
    """Label keys to remove; BadParameter for an empty key or one containing `=`."""
    keys: list[str] = []
    for item in values or []:
        key = item.strip()
        if not key or "=" in key:
            raise typer.BadParameter(
                f"expected a label KEY, got {item!r}", param_hint=f"'{option}'"
            )
        keys.append(key)
    return keys
