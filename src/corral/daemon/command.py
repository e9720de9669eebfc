"""``corral agent``: a click command whose options are generated from AgentSettings, so every
setting is a flag, a CORRAL_* variable and a config-file key without being listed twice."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from corral.daemon.settings import AgentSettings, SettingsError, load_settings

__all__ = ["agent_command"]


def _option(f: dataclasses.Field[Any]) -> click.Option:
    flag = "--" + f.name.replace("_", "-")
    help_text = f"{f.metadata.get('doc', '')} [env CORRAL_{f.name.upper()}]"
    if f.type in (bool, "bool"):
        return click.Option([flag], is_flag=True, default=None, help=help_text)
    if f.name == "labels":
        return click.Option(
            ["--label", "labels"], multiple=True, help="node label k=v (repeatable) "
            "[env CORRAL_LABELS=k=v,k2=v2]",
        )  # fmt: skip
    kind: Any = {int: int, "int": int, float: float, "float": float}.get(f.type, str)
    return click.Option([flag], type=kind, default=None, help=help_text)


def _run(config: str | None, **flags: Any) -> None:
    from corral.daemon.agent import Agent, AgentStartError
    from corral.telemetry import setup_logging

    labels = flags.pop("labels", ())
    flags["labels"] = ",".join(labels) if labels else None
    try:
        settings = load_settings(flags, config=Path(config) if config else None)
    except SettingsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    setup_logging(settings.log_level)
    try:
        asyncio.run(Agent(settings).run())
    except AgentStartError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


agent_command = click.Command(
    "agent",
    callback=_run,
    help="Run the corral agent on this host: etcd member, API, control loops and VMs.",
    params=[
        click.Option(["--config"], default=None, help="TOML file of settings [env CORRAL_CONFIG]"),
        *(_option(f) for f in dataclasses.fields(AgentSettings)),
    ],
)
