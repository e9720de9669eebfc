"""Following tasks: progress display while waiting, and what to print when they end.

The API call is always made without `?wait`; the CLI then polls `GET /tasks/{id}` itself, so
it can show progress and survive a slow server. On a terminal the progress is a Rich bar on
stderr; in a pipe it is one stderr line per change of state or step; with `-o json` nothing is
shown until the end. stdout gets only the final line (or the JSON).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from corral.cli.context import CliState
from corral.cli.render import dig, print_json, short_id
from corral.client import (
    TASK_FINAL_STATES,
    ActionResult,
    ApiObject,
    NotFound,
    TaskWaitTimeout,
    task_state,
)

__all__ = [
    "describe_task",
    "finish_action",
    "report_task_failure",
    "vm_refresher",
    "wait_with_progress",
]


def describe_task(task: ApiObject) -> str:
    """`task 6f1c2a3b (start vm/web-1)`: how messages name a task."""
    target = dig(task, "spec", "target")
    where = f"{target.get('kind', '?')}/{target.get('name', '?')}" if target else "?"
    return f"task {short_id(task.get('id'))} ({dig(task, 'spec', 'action') or '?'} {where})"


def _progress_of(task: ApiObject) -> tuple[str, float, str]:
    progress = dig(task, "status", "progress")
    fraction = float(progress) if isinstance(progress, int | float) else 0.0
    step = dig(task, "status", "step")
    return task_state(task), max(0.0, min(1.0, fraction)), str(step or "")


class _ProgressBar:
    """A transient Rich progress bar on a terminal: spinner, label, bar, %, step, elapsed."""

    def __init__(self, console: Console, label: str) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[step]}", markup=False),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._id = self._progress.add_task(label, total=100, step="")

    def __enter__(self) -> _ProgressBar:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def update(self, task: ApiObject) -> None:
        state, fraction, step = _progress_of(task)
        self._progress.update(self._id, completed=fraction * 100, step=step or state)
        self._progress.refresh()  # show each poll's answer at once, not at the next tick


class _ProgressLines:
    """Plain progress for pipes and logs: one stderr line whenever state, step or % changes."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._last: tuple[str, float, str] | None = None

    def __enter__(self) -> _ProgressLines:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def update(self, task: ApiObject) -> None:
        current = _progress_of(task)
        if current == self._last:
            return
        self._last = current
        state, fraction, step = current
        suffix = f" {step}" if step else ""
        typer.echo(f"{self._label}: {state} {fraction:.0%}{suffix}", err=True)


def wait_with_progress(
    state: CliState, task: ApiObject, *, timeout: float | None, show: bool
) -> ApiObject:
    """Poll `task` until it ends and return its final state, showing progress if `show`.

    Exits 1 (after saying how to follow it) when `timeout` passes, and 130 on Ctrl-C; in both
    cases the task goes on on the server.
    """
    task_id = str(task.get("id", ""))
    if task_state(task) in TASK_FINAL_STATES:
        return task
    label = describe_task(task).removeprefix("task ")
    display: _ProgressBar | _ProgressLines | None = None
    if show:
        display = _ProgressBar(state.err, label) if state.err.is_terminal else _ProgressLines(label)
    on_progress: Callable[[ApiObject], None] | None = display.update if display else None
    guard: AbstractContextManager[Any] = display if display is not None else nullcontext()
    follow = f"follow it with: corral task watch {task_id}"
    try:
        with guard:
            return state.client().wait_task(
                task_id,
                timeout=timeout,
                on_progress=on_progress,
                poll_interval=state.config.poll_interval,
            )
    except TaskWaitTimeout as exc:
        typer.echo(f"error: {exc.message}; the task goes on, {follow}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo(f"\nstopped waiting; the task goes on, {follow}", err=True)
        raise typer.Exit(130) from None


def report_task_failure(task: ApiObject) -> None:
    """Print why a failed or cancelled task ended, and its request id, on stderr."""
    final = task_state(task)
    error = dig(task, "status", "error")
    if final == "cancelled":
        message = f"{describe_task(task)} was cancelled" + (f": {error}" if error else "")
    else:
        message = f"{describe_task(task)} {final}: {error or 'no error message was recorded'}"
    typer.echo(f"error: {message}", err=True)
    if task.get("request_id"):
        typer.echo(f"request id: {task['request_id']}", err=True)


def finish_action(
    state: CliState,
    result: ActionResult,
    *,
    wait: bool,
    timeout: float | None,
    json_output: bool,
    refresh: Callable[[], ApiObject | None],
    success: Callable[[ApiObject | None, ApiObject | None], str],
    accepted: str,
) -> None:
    """Complete a create/delete/action command from the API's `{"object", "task"}` result.

    Without a task, or with `--no-wait`, print at once (`accepted` or the JSON). Otherwise
    wait, then print `success(object, task)`, or the JSON `?wait=true` would have returned:
    `{"object", "task"}` with the object as `refresh()` reads it now (None once deleted). A
    failed or cancelled task prints its error and exits 1.
    """
    task = result["task"]
    if task is None:
        if json_output:
            print_json(result)
        else:
            typer.echo(success(result["object"], None))
        return
    if not wait:
        if json_output:
            print_json(result)
        else:
            typer.echo(f"{accepted}: task {short_id(task.get('id'))} is {task_state(task)}")
            typer.echo(f"follow it with: corral task watch {task.get('id', '')}", err=True)
        return
    final = wait_with_progress(state, task, timeout=timeout, show=not json_output)
    obj = refresh()
    if json_output:
        print_json({"object": obj, "task": final})
    if task_state(final) != "succeeded":
        report_task_failure(final)
        raise typer.Exit(1)
    if not json_output:
        typer.echo(success(obj, final))


def vm_refresher(state: CliState, name: str) -> Callable[[], ApiObject | None]:
    """Reads VM ``name`` again for ``finish_action`` (None once it is gone)."""

    def refresh() -> ApiObject | None:
        try:
            return state.client().get_vm(name)
        except NotFound:
            return None

    return refresh
