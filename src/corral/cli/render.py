"""How the CLI prints: JSON, Rich tables, key/value views, human sizes and ages, errors.

Server data always goes into Rich as `Text` (never markup), so a name or message holding
`[red]` prints as written. JSON goes to stdout untouched by Rich; errors go to stderr.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import typer
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from corral.client import ApiError, CorralError, Unavailable

__all__ = [
    "STATE_STYLES",
    "cell",
    "dig",
    "emit",
    "fmt_age",
    "fmt_gib",
    "fmt_labels",
    "fmt_list",
    "fmt_mib",
    "fmt_time",
    "kv_view",
    "new_table",
    "parse_time",
    "print_json",
    "report_error",
    "short_id",
    "state_cell",
]

SHORT_ID = 8
"""Characters of an id shown in tables and messages (like git's short hashes)."""

STATE_STYLES: Mapping[str, str] = {
    "running": "green",
    "ready": "green",
    "succeeded": "green",
    "healthy": "green",
    "stopped": "dim",
    "pending": "yellow",
    "starting": "yellow",
    "stopping": "yellow",
    "deleting": "yellow",
    "migrating": "yellow",
    "paused": "yellow",
    "not-ready": "yellow",
    "cancelled": "yellow",
    "crashed": "red",
    "lost": "red",
    "failed": "red",
    "down": "red",
    "unhealthy": "red",
}


def print_json(data: object) -> None:
    """Print `data` as indented JSON on stdout, exactly as given (no Rich processing)."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def emit(console: Console, renderable: RenderableType) -> None:
    """Print a table or view on `console` without the padding Rich leaves at line ends."""
    with console.capture() as captured:
        console.print(renderable)
    lines = [line.rstrip() for line in captured.get().splitlines()]
    console.file.write("".join(f"{line}\n" for line in lines))
    console.file.flush()


def short_id(value: object) -> str:
    """The first characters of an id, enough to tell tasks apart."""
    return str(value or "")[:SHORT_ID]


def cell(value: object, style: str = "") -> Text:
    """A table cell holding `value` literally; None and "" show as "-"."""
    if value is None or value == "":
        return Text("-", style="dim")
    return Text(str(value), style=style)


def state_cell(state: object) -> Text:
    """A state word, coloured by what it means (green good, yellow moving, red bad)."""
    text = str(state or "unknown")
    return Text(text, style=STATE_STYLES.get(text, ""))


def new_table(*headers: str) -> Table:
    """A borderless table with bold upper-case headers, like `kubectl get`."""
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for header in headers:
        table.add_column(header, no_wrap=True)
    return table


def kv_view(rows: Iterable[tuple[str, RenderableType | None]]) -> Table:
    """A two-column "Key  value" view for `show` commands; None values show as "-"."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for key, value in rows:
        grid.add_row(Text(key), value if value is not None else cell(None))
    return grid


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 timestamp as an aware datetime; None if absent or unparseable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def fmt_age(value: object, now: datetime) -> str:
    """How long ago `value` was, as `45s`, `12m`, `3h` or `8d`; "-" if unknown."""
    when = parse_time(value)
    if when is None:
        return "-"
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def fmt_time(value: object, now: datetime) -> str | None:
    """A timestamp with its age, `2026-11-26T21:00:00Z (3h ago)`; None if absent."""
    if not value:
        return None
    age = fmt_age(value, now)
    return f"{value} ({age} ago)" if age != "-" else str(value)


def _number(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def fmt_mib(value: object) -> str:
    """MiB as a short size: 512 -> `512Mi`, 1024 -> `1Gi`, 24000 -> `23.4Gi`."""
    if not isinstance(value, int | float):
        return "-"
    if value >= 1024 * 1024:
        return f"{_number(value / (1024 * 1024))}Ti"
    if value >= 1024:
        return f"{_number(value / 1024)}Gi"
    return f"{_number(value)}Mi"


def fmt_gib(value: object) -> str:
    """GiB as a short size: 80.5 -> `80.5Gi`."""
    if not isinstance(value, int | float):
        return "-"
    return f"{_number(value)}Gi"


def fmt_labels(labels: object) -> str:
    """Labels as `k=v,k2=v2`, sorted by key; "" when there are none."""
    if not isinstance(labels, Mapping):
        return ""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def fmt_list(values: object) -> str:
    """A JSON list as `a,b`; "" when empty or not a list."""
    if not isinstance(values, Sequence) or isinstance(values, str):
        return ""
    return ",".join(str(v) for v in values)


def dig(obj: Mapping[str, Any], *path: str) -> Any:
    """`obj[path[0]][path[1]]...`, or None as soon as a level is missing or not a mapping."""
    current: Any = obj
    for key in path:
        if not isinstance(current, Mapping):
            return None
        current = current.get(key)
    return current


def report_error(exc: CorralError) -> None:
    """Print an error on stderr: `error: <detail>`, one line per field error, `request id`."""
    typer.echo(f"error: {exc.message}", err=True)
    if isinstance(exc, ApiError):
        for field_error in exc.errors:
            rule = f" [{field_error.rule}]" if field_error.rule else ""
            typer.echo(f"  {field_error}{rule}", err=True)
        for reason in exc.problem.get("reasons") or []:  # unschedulable: why each node said no
            if isinstance(reason, dict):
                typer.echo(f"  {reason.get('node', '?')}: {reason.get('reason', '?')}", err=True)
        if isinstance(exc, Unavailable) and exc.status is not None and exc.retry_after:
            typer.echo(f"retry after: {exc.retry_after:g}s", err=True)
        if exc.request_id:
            typer.echo(f"request id: {exc.request_id}", err=True)
