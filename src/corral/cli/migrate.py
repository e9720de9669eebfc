"""`corral vm migrate NAME [--to HOST]` (live migration, with a progress bar showing the
transferred and remaining MiB, the dirty rate and the expected downtime) and `corral task
cancel ID`."""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer

from corral.cli.context import get_state
from corral.cli.params import OutputOpt, TimeoutOpt, WaitOpt, parse_memory
from corral.cli.render import cell, dig, emit, kv_view, print_json, short_id
from corral.cli.task import resolve_task
from corral.cli.vm import plan_table
from corral.cli.waiting import finish_action, vm_refresher
from corral.client import ApiObject

__all__ = ["attach_migrate_commands", "parse_duration_ms"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$", re.IGNORECASE)


def parse_duration_ms(value: str) -> int:
    """Milliseconds from `300`, `300ms`, `0.5s`, `2s`; BadParameter otherwise."""
    match = _DURATION.match(value)
    if match is None:
        raise typer.BadParameter(f"{value!r} is not a duration; use e.g. 100ms, 300, 0.5s")
    number, unit = float(match.group(1)), (match.group(2) or "ms").lower()
    ms = number * (1000 if unit == "s" else 1)
    if ms < 1 or ms != int(ms):
        raise typer.BadParameter(f"{value!r} must be a whole number of milliseconds, at least 1")
    return int(ms)


def _migrated_line(name: str) -> Any:
    def describe(vm: ApiObject | None, task: ApiObject | None) -> str:
        result = dig(task or {}, "status", "result") or {}
        node = dig(vm or {}, "status", "node")
        line = f"vm {name} migrated from {result.get('source', '?')} to {node or '?'}"
        if result.get("downtime_ms") is not None:
            line += f": downtime {result['downtime_ms']} ms (measured by QEMU)"
        if result.get("total_time_ms") is not None:
            line += f", total {result['total_time_ms'] / 1000:.1f} s"
        if task is not None:
            line += f" (task {short_id(task.get('id'))})"
        return line

    return describe


def attach_migrate_commands(vm_app: typer.Typer, task_app: typer.Typer) -> None:
    @vm_app.command("migrate")
    def vm_migrate(
        ctx: typer.Context,
        name: Annotated[str, typer.Argument(metavar="NAME", help="The VM's name.")],
        to: Annotated[
            str | None,
            typer.Option(
                "--to", metavar="HOST", help="Target host (default: the scheduler picks)."
            ),
        ] = None,
        max_downtime: Annotated[
            int | None,
            typer.Option(
                "--max-downtime",
                parser=parse_duration_ms,
                metavar="DURATION",
                help="Longest pause allowed at switch-over (default 300ms; raised in steps "
                "if memory does not converge).",
                show_default=False,
            ),
        ] = None,
        bandwidth: Annotated[
            int | None,
            typer.Option(
                "--bandwidth",
                parser=parse_memory,
                metavar="SIZE",
                help="Cap on migration traffic per second, e.g. 200MiB (default: none).",
                show_default=False,
            ),
        ] = None,
        migration_timeout: Annotated[
            int | None,
            typer.Option(
                "--migration-timeout",
                min=5,
                metavar="SECONDS",
                help="Give up and roll back after this long (default 600).",
                show_default=False,
            ),
        ] = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Show the target and why; change nothing.")
        ] = False,
        wait: WaitOpt = True,
        timeout: TimeoutOpt = None,
        output: OutputOpt = None,
    ) -> None:
        """Live-migrate a running VM to another host; the guest keeps running."""
        state = get_state(ctx)
        body: dict[str, Any] = {}
        if to is not None:
            body["target"] = to
        if max_downtime is not None:
            body["max_downtime_ms"] = max_downtime
        if bandwidth is not None:
            body["bandwidth_mib_s"] = bandwidth
        if migration_timeout is not None:
            body["timeout_s"] = migration_timeout
        client = state.client()
        if dry_run:
            plan = client.migrate_plan(name, body)
            if state.wants_json(output):
                print_json(plan)
                return
            emit(
                state.out,
                kv_view(
                    [
                        ("VM", cell(plan.get("vm"))),
                        ("From", cell(plan.get("source"))),
                        ("To", cell(plan.get("target"))),
                        ("Why", cell(plan.get("reason"))),
                        ("Transfer", cell(plan.get("transfer"))),
                    ]
                ),
            )
            if plan.get("placement"):
                emit(state.out, plan_table(plan["placement"]))
            return

        finish_action(
            state,
            client.migrate_vm(name, body),
            wait=wait,
            timeout=timeout,
            json_output=state.wants_json(output),
            refresh=vm_refresher(state, name),
            success=_migrated_line(name),
            accepted=f"migration of vm {name} accepted",
        )

    @task_app.command("cancel")
    def task_cancel(
        ctx: typer.Context,
        task_id: Annotated[str, typer.Argument(metavar="ID", help="A task id or unique prefix.")],
        output: OutputOpt = None,
    ) -> None:
        """Cancel a running task (a migration: the guest keeps running on the source)."""
        state = get_state(ctx)
        client = state.client()
        task = resolve_task(client, task_id)
        answer = client.cancel_task(str(task.get("id")))
        if state.wants_json(output):
            print_json(answer)
            return
        typer.echo(
            f"cancel of task {short_id(answer.get('id'))} requested; "
            f"follow it with: corral task watch {answer.get('id')}"
        )
