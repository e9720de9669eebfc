"""`corral task ...`: list, show and watch the tasks that do long-running work.

Task ids may be given in full or as a unique prefix (the short ids tables print).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from corral.cli.context import get_state
from corral.cli.params import OutputOpt, TimeoutOpt
from corral.cli.render import (
    cell,
    dig,
    emit,
    fmt_age,
    fmt_time,
    kv_view,
    new_table,
    print_json,
    short_id,
    state_cell,
)
from corral.cli.waiting import describe_task, report_task_failure, wait_with_progress
from corral.client import ApiObject, CorralClient, NotFound, task_state

__all__ = ["resolve_task", "task_app"]

task_app = typer.Typer(name="task", help="Follow long-running work.", no_args_is_help=True)

IdArg = Annotated[str, typer.Argument(metavar="ID", help="A task id, or a unique prefix of one.")]
_FULL_ID = 32
"""An id at least this long is not treated as a prefix (UUIDs are 32 hex digits)."""


def resolve_task(client: CorralClient, task_id: str) -> ApiObject:
    """The task with this id, or the only task whose id starts with it.

    Raises NotFound when nothing matches and a usage error when a prefix is ambiguous.
    """
    try:
        return client.get_task(task_id)
    except NotFound as exc:
        if len(task_id.replace("-", "")) >= _FULL_ID:
            raise
        missing = exc
    matches = [t for t in client.iter_tasks() if str(t.get("id", "")).startswith(task_id)]
    if not matches:
        raise missing
    if len(matches) > 1:
        shown = ", ".join(short_id(t.get("id")) for t in matches[:5])
        raise typer.BadParameter(
            f"{task_id!r} matches {len(matches)} tasks ({shown}...); give more characters",
            param_hint="'ID'",
        )
    return matches[0]


def _target(task: ApiObject) -> str:
    target = dig(task, "spec", "target")
    if not isinstance(target, dict):
        return "-"
    return f"{target.get('kind', '?')}/{target.get('name', '?')}"


def _percent(task: ApiObject) -> str:
    progress = dig(task, "status", "progress")
    return f"{progress:.0%}" if isinstance(progress, int | float) else "-"


@task_app.command("ls")
def task_ls(
    ctx: typer.Context,
    task_state_filter: Annotated[
        str | None,
        typer.Option("--state", help="Only tasks in this state (running, failed, ...)."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target", metavar="KIND/NAME", help="Only tasks on this object, e.g. vm/web-1."
        ),
    ] = None,
    output: OutputOpt = None,
) -> None:
    """List tasks: ID (short), ACTION, TARGET, STATE, PROGRESS, STEP, AGE."""
    state = get_state(ctx)
    pager = state.client().iter_tasks(state=task_state_filter, target=target)
    items = list(pager)
    if state.wants_json(output):
        print_json({"items": items, "next_cursor": None, "revision": pager.revision})
        return
    if not items:
        typer.echo("no tasks found", err=True)
        return
    now = state.now()
    table = new_table("ID", "ACTION", "TARGET", "STATE", "PROGRESS", "STEP", "AGE")
    for task in items:
        table.add_row(
            cell(short_id(task.get("id"))),
            cell(dig(task, "spec", "action")),
            cell(_target(task)),
            state_cell(task_state(task)),
            cell(_percent(task)),
            cell(dig(task, "status", "step")),
            cell(fmt_age(task.get("created_at"), now)),
        )
    emit(state.out, table)


def _task_view(task: ApiObject, now: datetime) -> Group:
    result = dig(task, "status", "result")
    rows = [
        ("ID", cell(task.get("id"))),
        ("Action", cell(dig(task, "spec", "action"))),
        ("Target", cell(_target(task))),
        ("State", state_cell(task_state(task))),
        ("Progress", cell(_percent(task))),
        ("Step", cell(dig(task, "status", "step"))),
        ("Error", cell(dig(task, "status", "error"), style="red")),
        ("Result", cell(json.dumps(result) if result else None)),
        ("Actor", cell(task.get("actor"))),
        ("Request id", cell(task.get("request_id"))),
        ("Created", cell(fmt_time(task.get("created_at"), now))),
        ("Started", cell(fmt_time(dig(task, "status", "started_at"), now))),
        ("Finished", cell(fmt_time(dig(task, "status", "finished_at"), now))),
    ]
    steps = new_table("STEP", "STATE", "STARTED", "FINISHED")
    for step in dig(task, "status", "steps") or []:
        if isinstance(step, dict):
            steps.add_row(
                cell(step.get("name")),
                state_cell(step.get("state")),
                cell(step.get("started_at")),
                cell(step.get("finished_at")),
            )
    parts: list[Table | Text] = [kv_view(rows)]
    if steps.row_count:
        parts += [Text(""), steps]
    return Group(*parts)


@task_app.command("show")
def task_show(ctx: typer.Context, task_id: IdArg, output: OutputOpt = None) -> None:
    """Show one task: action, target, state, progress, its steps, error and result."""
    state = get_state(ctx)
    task = resolve_task(state.client(), task_id)
    if state.wants_json(output):
        print_json(task)
        return
    emit(state.out, _task_view(task, state.now()))


@task_app.command("watch")
def task_watch(
    ctx: typer.Context, task_id: IdArg, timeout: TimeoutOpt = None, output: OutputOpt = None
) -> None:
    """Follow a task with a progress bar until it ends; exit 1 if it failed or was cancelled."""
    state = get_state(ctx)
    json_output = state.wants_json(output)
    task = resolve_task(state.client(), task_id)
    final = wait_with_progress(state, task, timeout=timeout, show=not json_output)
    if json_output:
        print_json(final)
    if task_state(final) != "succeeded":
        report_task_failure(final)
        raise typer.Exit(1)
    if not json_output:
        typer.echo(f"{describe_task(final)} succeeded")


@task_app.command("cancel")
def task_cancel(ctx: typer.Context, task_id: IdArg, output: OutputOpt = None) -> None:
    """Cancel a migration (it rolls back: the guest stays on its source), a drain or a
    rebalance (no further moves start; moves under way finish)."""
    state = get_state(ctx)
    client = state.client()
    task = resolve_task(client, task_id)
    updated = client.cancel_task(str(task.get("id")))
    if state.wants_json(output):
        print_json(updated)
        return
    typer.echo(f"cancel of {describe_task(updated)} requested")
