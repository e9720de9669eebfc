"""`corral vm snapshot create|ls|rollback|delete` and `corral vm clone`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from corral.cli.context import CliState, get_state
from corral.cli.params import LabelsOpt, OutputOpt, TimeoutOpt, WaitOpt, parse_labels
from corral.cli.render import cell, dig, emit, fmt_age, new_table, print_json
from corral.cli.waiting import finish_action, vm_refresher
from corral.client import ApiObject, NotFound

__all__ = ["add_snapshot_commands", "snapshot_app"]

snapshot_app = typer.Typer(
    name="snapshot", help="Snapshots of a VM's disks (and memory).", no_args_is_help=True
)

VmArg = Annotated[str, typer.Argument(metavar="VM", show_default=False)]
SnapArg = Annotated[str, typer.Argument(metavar="SNAPSHOT", show_default=False)]


def _mib(value: Any) -> str:
    size = int(value or 0)
    return f"{size / (1024 * 1024):.1f} MiB" if size else "-"


def _finish(
    state: CliState, result: Any, vm: str, what: str, wait: bool, timeout: float | None, output: Any
) -> None:
    def refresh() -> ApiObject | None:
        obj = result.get("object") or {}
        name = dig(obj, "spec", "snapshot")
        try:
            items = state.client().list_snapshots(vm)["items"]
        except NotFound:
            return None
        return next((s for s in items if dig(s, "spec", "snapshot") == name), None)

    def describe(obj: ApiObject | None, task: ApiObject | None) -> str:
        extra = ""
        res = (task or {}).get("status", {}).get("result") or {}
        if "with_memory" in res:
            extra = " (with memory)" if res["with_memory"] else " (disks only)"
        if res.get("note"):
            extra += f"; {res['note']}"
        return f"{what}{extra}"

    finish_action(
        state,
        result,
        wait=wait,
        timeout=timeout,
        json_output=state.wants_json(output),
        refresh=refresh,
        success=describe,
        accepted=f"{what.split(':')[0]} accepted",
    )


@snapshot_app.command("create")
def snapshot_create(
    ctx: typer.Context,
    vm: VmArg,
    name: SnapArg,
    memory: Annotated[
        bool | None,
        typer.Option(
            "--memory/--no-memory",
            help="Also save the RAM (default: when the VM runs); --no-memory: disks only.",
            show_default=False,
        ),
    ] = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    output: OutputOpt = None,
) -> None:
    """Snapshot a VM's disks (and memory) under NAME."""
    state = get_state(ctx)
    result = state.client().create_snapshot(vm, name, memory=memory)
    _finish(state, result, vm, f"snapshot {name} of vm {vm} taken", wait, timeout, output)


@snapshot_app.command("ls")
def snapshot_ls(ctx: typer.Context, vm: VmArg, output: OutputOpt = None) -> None:
    """List a VM's snapshots as a tree (* current): NAME, STATE, MEMORY, VM STATE, RAM SIZE
    (the saved VM state, as QEMU reports it), DISK (the disk files' allocation just after the
    snapshot, and its growth since the parent's), PARENT, AGE."""
    state = get_state(ctx)
    page = state.client().list_snapshots(vm)
    if state.wants_json(output):
        print_json(page)
        return
    items = page["items"]
    if not items:
        typer.echo(f"vm {vm} has no snapshots", err=True)
        return
    children: dict[str | None, list[ApiObject]] = {}
    names = {dig(s, "spec", "snapshot") for s in items}
    for snap in items:
        parent = dig(snap, "status", "parent")
        children.setdefault(parent if parent in names else None, []).append(snap)
    table = new_table("NAME", "STATE", "MEMORY", "VM STATE", "RAM SIZE", "DISK", "PARENT", "AGE")
    now = state.now()
    by_name = {str(dig(s, "spec", "snapshot")): s for s in items}

    def disk(snap: ApiObject) -> str:
        size = int(dig(snap, "status", "disk_bytes") or 0)
        if not size:
            return "-"
        parent = by_name.get(str(dig(snap, "status", "parent")))
        before = int(dig(parent, "status", "disk_bytes") or 0) if parent else 0
        grown = f" (+{_mib(size - before)})" if before and size > before else ""
        return _mib(size) + grown

    def walk(parent: str | None, depth: int) -> None:
        for snap in children.get(parent, []):
            name = str(dig(snap, "spec", "snapshot"))
            mark = " *" if dig(snap, "status", "current") else ""
            table.add_row(
                cell("  " * depth + ("└ " if depth else "") + name + mark),
                cell(dig(snap, "status", "state")),
                cell("yes" if dig(snap, "status", "with_memory") else "no"),
                cell(dig(snap, "status", "vm_state") or "-"),
                cell(_mib(dig(snap, "status", "vm_state_bytes"))),
                cell(disk(snap)),
                cell(dig(snap, "status", "parent") or "-"),
                cell(fmt_age(snap.get("created_at"), now)),
            )
            walk(name, depth + 1)

    walk(None, 0)
    emit(state.out, table)


@snapshot_app.command("rollback")
def snapshot_rollback(
    ctx: typer.Context,
    vm: VmArg,
    name: SnapArg,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    output: OutputOpt = None,
) -> None:
    """Put the VM back to a snapshot (a running VM needs a snapshot with memory)."""
    state = get_state(ctx)
    result = state.client().rollback_snapshot(vm, name)
    _finish(state, result, vm, f"vm {vm} rolled back to {name}", wait, timeout, output)


@snapshot_app.command("delete")
def snapshot_delete(
    ctx: typer.Context,
    vm: VmArg,
    name: SnapArg,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    output: OutputOpt = None,
) -> None:
    """Delete a snapshot (its children hang from its parent afterwards)."""
    state = get_state(ctx)
    result = state.client().delete_snapshot(vm, name)
    _finish(state, result, vm, f"snapshot {name} of vm {vm} deleted", wait, timeout, output)


def finish_new_vm(
    state: CliState, result: Any, name: str, wait: bool, timeout: float | None, output: Any
) -> None:
    """Wait for a cloned or instantiated VM's create task; print where it is."""

    def describe(obj: ApiObject | None, task: ApiObject | None) -> str:
        st = dig(obj or {}, "status", "state")
        node = dig(obj or {}, "status", "node")
        disks = ", ".join(str(d.get("volume")) for d in dig(obj or {}, "spec", "disks") or [])
        return f"vm {name} {st} on {node or '-'} (disks: {disks or 'none'})"

    finish_action(
        state,
        result,
        wait=wait,
        timeout=timeout,
        json_output=state.wants_json(output),
        refresh=vm_refresher(state, name),
        success=describe,
        accepted=f"vm {name} accepted",
    )


def vm_clone(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(metavar="SOURCE", show_default=False)],
    name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)],
    linked: Annotated[
        bool,
        typer.Option(
            "--linked/--full",
            help="--full (default): copy every disk. --linked: the source's disks become "
            "read-only bases that it and the clone share (each writes to its own overlay).",
        ),
    ] = False,
    to: Annotated[
        str | None,
        typer.Option(
            "--to", metavar="NODE", help="Copy the disks to this host (full clones); run there."
        ),
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option("--pool", metavar="POOL", help="Copy the disks into this pool (full clones)."),
    ] = None,
    start: Annotated[bool, typer.Option("--start", help="Start the clone.")] = False,
    labels: LabelsOpt = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    output: OutputOpt = None,
) -> None:
    """Clone a VM (a running one keeps running): new disks, new MAC addresses."""
    state = get_state(ctx)
    body: dict[str, Any] = {"name": name, "linked": linked, "start": start}
    if to is not None:
        body["to"] = to
    if pool is not None:
        body["pool"] = pool
    if labels:
        body["labels"] = parse_labels(labels)
    result = state.client().clone_vm(source, body)
    finish_new_vm(state, result, name, wait, timeout, output)


def add_snapshot_commands(vm_app: typer.Typer) -> None:
    vm_app.add_typer(snapshot_app, name="snapshot")
    vm_app.command("clone")(vm_clone)
