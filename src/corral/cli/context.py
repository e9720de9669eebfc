"""Per-invocation state of the CLI, and the seam tests use to point it at a fake API.

The root callback turns the global options into a `CliState` and stores it as the click
context object; every command reads it with `get_state(ctx)`. How the state reaches the API
and the terminal comes from a `CliConfig`: `main()` uses the defaults (the network, real
terminals), tests pass their own as the context object::

    fake = FakeCorralApi()
    result = CliRunner().invoke(app, ["vm", "ls"], obj=CliConfig(transport=fake.transport()))

Nothing is patched and nothing global changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

import httpx
import typer
from rich.console import Console

from corral.client import DEFAULT_ADDR, CorralClient

__all__ = [
    "DEFAULT_ADDR",
    "CliConfig",
    "CliState",
    "OutputFormat",
    "get_state",
]

_PIPE_WIDTH = 4096
"""Console width when stdout is not a terminal: rows never wrap in pipes, files or tests."""


class OutputFormat(StrEnum):
    """What commands print on stdout: Rich tables and lines, or exactly the API's JSON."""

    TABLE = "table"
    JSON = "json"


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class CliConfig:
    """How the CLI reaches the API and the terminal; the seam tests use.

    Pass one as the context object (`CliRunner().invoke(app, args, obj=CliConfig(...))`);
    without one, the defaults below apply.
    """

    transport: httpx.BaseTransport | None = None
    """httpx transport for every request; None means the network (tests: a MockTransport)."""
    timeout: float = 10.0
    """Seconds each HTTP request may take."""
    poll_interval: float = 0.5
    """Seconds between polls of a task while waiting for it."""
    now: Callable[[], datetime] = field(default=_utcnow)
    """The clock AGE and HEARTBEAT columns count from."""
    force_terminal: bool | None = None
    """Treat stdout/stderr as terminals (True), as pipes (False) or detect (None)."""
    width: int | None = None
    """Console width; None: the terminal's, or unlimited when not a terminal."""

    def make_client(self, addr: str) -> CorralClient:
        """A client for `addr`; raises ValueError if the address is not usable."""
        return CorralClient(addr, timeout=self.timeout, transport=self.transport)

    def make_console(self, *, stderr: bool) -> Console:
        """A Rich console on stdout or stderr that never interprets server data as markup."""
        console = Console(
            stderr=stderr,
            highlight=False,
            force_terminal=self.force_terminal,
            width=self.width,
        )
        if self.width is None and not console.is_terminal:
            console.width = _PIPE_WIDTH
        return console


class CliState:
    """The context object below the root command: global options, consoles, the client.

    The client is made on first use (so `--help` and commands that never call the API do not
    need a valid `--addr`) and closed when the command ends.
    """

    def __init__(self, config: CliConfig, addr: str, output: OutputFormat) -> None:
        self.config = config
        self.addr = addr
        self.output = output
        self.out = config.make_console(stderr=False)
        self.err = config.make_console(stderr=True)
        self._client: CorralClient | None = None

    def client(self) -> CorralClient:
        """The API client for `--addr`; a usage error (exit 2) if the address is unusable."""
        if self._client is None:
            try:
                self._client = self.config.make_client(self.addr)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="'--addr' / CORRAL_ADDR") from exc
        return self._client

    def output_for(self, local: OutputFormat | None) -> OutputFormat:
        """The format for a command: its own `-o` if given, else the global one."""
        return local if local is not None else self.output

    def wants_json(self, local: OutputFormat | None) -> bool:
        """True when the command must print the API's JSON."""
        return self.output_for(local) is OutputFormat.JSON

    def now(self) -> datetime:
        """The current time, from the configured clock."""
        return self.config.now()

    def close(self) -> None:
        """Close the client's connections, if one was made."""
        if self._client is not None:
            self._client.close()
            self._client = None


def get_state(ctx: typer.Context) -> CliState:
    """The `CliState` the root callback stored; RuntimeError if a command runs without it."""
    state = ctx.find_object(CliState)
    if state is None:
        raise RuntimeError("corral CLI commands must run below corral.cli.app")
    return state
