"""Helpers for CLI tests: run `corral` against a fake API and read what it printed."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from typer.testing import CliRunner, Result

from corral.cli import CliConfig, app
from corral.client.testing import FakeCorralApi

CREATED = datetime(2026, 11, 26, 21, 0, tzinfo=UTC)
"""When the fake API stamps everything."""
NOW = CREATED + timedelta(minutes=2)
"""What the CLI's clock says: every object is 2 minutes old."""

_BOX = re.compile(r"[╭╮╰╯│─]")


@dataclass
class Cli:
    """Runs `corral ARGS...` in-process against `fake`; the environment is isolated."""

    fake: FakeCorralApi
    force_terminal: bool = False

    def config(self) -> CliConfig:
        return CliConfig(
            transport=self.fake.transport(),
            poll_interval=0,
            now=lambda: NOW,
            force_terminal=self.force_terminal,
        )

    def __call__(
        self,
        *args: str,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        config: CliConfig | None = None,
    ) -> Result:
        environment: dict[str, str | None] = {"CORRAL_ADDR": None, "CORRAL_OUTPUT": None}
        environment.update(env or {})
        return CliRunner().invoke(
            app, list(args), obj=config or self.config(), input=input, env=environment
        )


def rows(text: str) -> list[list[str]]:
    """The rows of a printed table (header first), cells split on runs of 2+ spaces."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if line.strip()]


def row_for(text: str, first: str) -> list[str]:
    """The table row whose first cell is `first`."""
    matches = [row for row in rows(text) if row[0] == first]
    assert len(matches) == 1, f"expected one row for {first!r} in:\n{text}"
    return matches[0]


def kv(text: str) -> dict[str, str]:
    """A `show` view as {key: value}; keys and values are separated by 2+ spaces."""
    pairs = (re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in text.splitlines())
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def squash(text: str) -> str:
    """Text without Rich's box drawing and with whitespace runs collapsed (for usage errors)."""
    return " ".join(_BOX.sub(" ", text).split())


def json_out(result: Result) -> Any:
    return json.loads(result.stdout)
