"""``corral agent``: a Typer command whose options are generated from AgentSettings, so every
setting is a flag, a CORRAL_* variable and a config-file key without being listed twice."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import inspect
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from corral.daemon.settings import AgentSettings, SettingsError, load_settings

__all__ = ["add_agent_command"]

_HELP = "Run the corral agent on this host: etcd member, API, control loops and VMs."


def _tune_gc() -> None:
    """Collect cyclic garbage less often than CPython's default, which suits scripts.

    An agent keeps hundreds of thousands of long-lived objects (decoded records, caches,
    FastAPI's routes) and allocates fast while VMs are created. With the default thresholds
    (a young collection every 700 allocations) a 3-server cluster creating 1,000 VMs spent
    ~20% of the leader's CPU in the collector, mostly in full passes over the long-lived heap
    (0.14 s each). What exists after start-up is frozen (never scanned again; the agent's
    modules and settings live as long as it does); young collections run every 50,000
    allocations and a full one at most every 10 middle ones (CPython still skips it until
    the objects that survived since the last full pass add up to a quarter of the heap).
    Measured with ``bench.scheduler --e2e`` (1,000 VMs): the leader's collector time went from
    1.5 s to 0.6 s, start-up included; reference counting still frees all but cycles at once.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


def _run_agent(**flags: Any) -> None:
    # The agent forks etcd, serf and QEMU while grpc threads run; grpc's fork handlers only
    # print warnings then, so they are off (children exec at once and never use grpc).
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from corral.daemon.agent import Agent, AgentStartError
    from corral.telemetry import setup_logging

    config = flags.pop("config", None)
    labels = flags.pop("labels", None)
    flags["labels"] = ",".join(labels) if labels else None
    try:
        settings = load_settings(flags, config=Path(config) if config else None)
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    setup_logging(settings.log_level)
    _tune_gc()
    profile_dir = os.environ.get("CORRAL_PROFILE_DIR")
    profiler = None
    if profile_dir:
        # For benchmarks only: profile the whole agent, written out when it stops.
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        asyncio.run(Agent(settings).run())
    except AgentStartError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(Path(profile_dir or ".") / f"{settings.name}.prof"))


def _parameters() -> list[inspect.Parameter]:
    """One keyword parameter per setting; None means "not given on the command line"."""
    kinds: dict[Any, Any] = {"bool": bool, "int": int, "float": float, "Path": Path, "str": str}
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                str | None,
                typer.Option("--config", help="TOML file of settings (env CORRAL_CONFIG)"),
            ],
        )
    ]
    for f in dataclasses.fields(AgentSettings):
        help_text = f"{f.metadata['doc']} (env CORRAL_{f.name.upper()})"
        if f.name == "labels":
            annotation: Any = Annotated[
                list[str] | None,
                typer.Option("--label", help="node label k=v, repeatable (env CORRAL_LABELS)"),
            ]
        else:
            kind = kinds.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            flag = "--" + f.name.replace("_", "-")
            decls = [flag] if kind is not bool else [f"{flag}/--no-{flag[2:]}"]
            annotation = Annotated[kind | None, typer.Option(*decls, help=help_text)]
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
            )
        )
    return params


def add_agent_command(app: typer.Typer) -> None:
    """Register ``agent`` on the user CLI's app."""

    def agent(**flags: Any) -> None:
        _run_agent(**flags)

    params = _parameters()
    agent.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    agent.__annotations__ = {p.name: p.annotation for p in params}
    agent.__doc__ = _HELP
    app.command("agent", help=_HELP)(agent)
