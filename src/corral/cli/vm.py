"""`corral vm ...`: list, show, create, edit, start, stop, reboot, pause, resume and delete
virtual machines, and read (`log`) or attach to (`console`) their serial consoles."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any

import typer

from corral.cli.console import run_console
from corral.cli.context import CliState, OutputFormat, get_state
from corral.cli.params import (
    LabelsOpt,
    OutputOpt,
    TimeoutOpt,
    WaitOpt,
    parse_label_keys,
    parse_labels,
    parse_memory,
)
from corral.cli.render import (
    cell,
    dig,
    emit,
    fmt_age,
    fmt_labels,
    fmt_mib,
    fmt_time,
    kv_view,
    new_table,
    print_json,
    short_id,
    state_cell,
)
from corral.cli.storage import parse_gib
from corral.cli.waiting import finish_action, vm_refresher
from corral.client import ActionResult, ApiObject

__all__ = ["vm_app"]

vm_app = typer.Typer(
    name="vm", help="Create, inspect and drive virtual machines.", no_args_is_help=True
)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The VM's name.", show_default=False)]
VcpusOpt = Annotated[
    int | None, typer.Option("--vcpus", min=1, help="Virtual CPUs.", show_default=False)
]
MemoryOpt = Annotated[
    int | None,
    typer.Option(
        "--memory",
        "-m",
        parser=parse_memory,
        metavar="SIZE",
        help="Memory: MiB (512) or with a unit (512M, 1G, 1.5G, 2048MiB).",
        show_default=False,
    ),
]


class RestartPolicy(StrEnum):
    always = "always"
    on_failure = "on-failure"
    never = "never"


RestartPolicyOpt = Annotated[
    RestartPolicy | None,
    typer.Option(
        "--restart-policy",
        help=(
            "When the VM goes down on its own: on-failure (the default) restarts it after a "
            "crash, not after the guest powered itself off; always restarts it either way; "
            "never leaves it down."
        ),
        case_sensitive=False,
        show_default=False,
    ),
]


def _vm_line(name: str) -> Callable[[ApiObject | None, ApiObject | None], str]:
    """A describer of how VM `name` ended up: `vm web-1 running on n1 (task 6f1c2a3b)`."""

    def describe(vm: ApiObject | None, task: ApiObject | None) -> str:
        vm = vm or {}
        line = f"vm {name} {dig(vm, 'status', 'state') or 'gone'}"
        node = dig(vm, "status", "node")
        if node:
            line += f" on {node}"
        message = dig(vm, "status", "message")
        if message:
            line += f": {message}"
        if task is not None:
            line += f" (task {short_id(task.get('id'))})"
        return line

    return describe


def _finish(
    state: CliState,
    result: ActionResult,
    *,
    name: str,
    verb: str,
    wait: bool,
    timeout: float | None,
    output: OutputFormat | None,
) -> None:
    finish_action(
        state,
        result,
        wait=wait,
        timeout=timeout,
        json_output=state.wants_json(output),
        refresh=vm_refresher(state, name),
        success=_vm_line(name),
        accepted=f"{verb} of vm {name} accepted",
    )


@vm_app.command("ls")
def vm_ls(
    ctx: typer.Context,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            "-l",
            metavar="SELECTOR",
            help="Label selector, e.g. tier=web,env!=prod; repeats are ANDed.",
            show_default=False,
        ),
    ] = None,
    node: Annotated[
        str | None, typer.Option("--node", help="Only VMs on this node.", show_default=False)
    ] = None,
    vm_state: Annotated[
        str | None,
        typer.Option("--state", help="Only VMs in this state (running, ...).", show_default=False),
    ] = None,
    output: OutputOpt = None,
) -> None:
    """List VMs (every page): NAME, STATE, NODE, VCPUS, MEMORY, LABELS, AGE."""
    state = get_state(ctx)
    selector = ",".join(label) if label else None
    pager = state.client().iter_vms(label=selector, node=node, state=vm_state)
    items = list(pager)
    if state.wants_json(output):
        print_json({"items": items, "next_cursor": None, "revision": pager.revision})
        return
    if not items:
        typer.echo("no vms found", err=True)
        return
    now = state.now()
    table = new_table("NAME", "STATE", "NODE", "VCPUS", "MEMORY", "LABELS", "AGE")
    for vm in items:
        table.add_row(
            cell(vm.get("name")),
            state_cell(dig(vm, "status", "state")),
            cell(dig(vm, "status", "node")),
            cell(dig(vm, "spec", "vcpus")),
            cell(fmt_mib(dig(vm, "spec", "memory_mib"))),
            cell(fmt_labels(dig(vm, "spec", "labels"))),
            cell(fmt_age(vm.get("created_at"), now)),
        )
    emit(state.out, table)


@vm_app.command("log")
def vm_log(
    ctx: typer.Context,
    name: NameArg,
    max_bytes: Annotated[
        int, typer.Option("--bytes", min=1, max=1024 * 1024, help="How much of the end to show.")
    ] = 16 * 1024,
) -> None:
    """Print the end of the VM's serial console output (what the guest printed)."""
    typer.echo(get_state(ctx).client().console_log(name, max_bytes=max_bytes), nl=False)


@vm_app.command("console")
def vm_console(
    ctx: typer.Context,
    name: NameArg,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout", min=0.1, help="Leave after this many seconds.", show_default=False
        ),
    ] = None,
    linger: Annotated[
        float,
        typer.Option(
            "--linger",
            min=0,
            help="When stdin is not a terminal: seconds to keep printing after it ends.",
        ),
    ] = 2.0,
    ticket_only: Annotated[
        bool,
        typer.Option(
            "--ticket-only", help="Print a console ticket (for another client) and leave."
        ),
    ] = False,
    vnc: Annotated[
        bool, typer.Option("--vnc", help="With --ticket-only: a ticket for the VNC console.")
    ] = False,
    output: OutputOpt = None,
) -> None:
    """Attach to the VM's serial console (read and type); Ctrl-] leaves.

    With stdin not a terminal it is scriptable: `echo uptime | corral vm console web-1`
    sends stdin, prints the output and leaves --linger seconds after stdin ends.
    """
    state = get_state(ctx)
    if vnc and not ticket_only:
        raise typer.BadParameter(
            "a VNC console needs a VNC viewer: use --vnc with --ticket-only and give the "
            "ticket's path to noVNC or websockify",
            param_hint="'--vnc'",
        )
    client = state.client()
    ticket = client.console_ticket(name, "vnc" if vnc else "serial")
    if ticket_only:
        if state.wants_json(output):
            print_json(ticket)
        else:
            emit(
                state.out,
                kv_view(
                    [
                        ("Ticket", cell(ticket.get("ticket"))),
                        ("Console", cell(ticket.get("console"))),
                        ("Expires", cell(ticket.get("expires_at"))),
                        ("URL", cell(client.console_url(ticket))),
                    ]
                ),
            )
        return
    end = run_console(
        client.console_url(ticket),
        name=name,
        linger=linger,
        timeout=timeout,
        err=lambda line: state.err.print(line, markup=False, highlight=False),
    )
    if end.exit_code:
        raise typer.Exit(end.exit_code)


@vm_app.command("show")
def vm_show(ctx: typer.Context, name: NameArg, output: OutputOpt = None) -> None:
    """Show one VM: desired spec, observed status and revisions."""
    state = get_state(ctx)
    vm = state.client().get_vm(name)
    if state.wants_json(output):
        print_json(vm)
        return
    now = state.now()
    generation = vm.get("generation")
    observed = dig(vm, "status", "observed_generation")
    rows = [
        ("Name", cell(vm.get("name"))),
        ("ID", cell(vm.get("id"))),
        ("State", state_cell(dig(vm, "status", "state"))),
        ("Node", cell(dig(vm, "status", "node"))),
        ("Message", cell(dig(vm, "status", "message"))),
        ("Power (desired)", cell(dig(vm, "spec", "power_state"))),
        ("Restart policy", cell(dig(vm, "spec", "restart_policy"))),
        ("vCPUs", cell(dig(vm, "spec", "vcpus"))),
        ("Memory", cell(fmt_mib(dig(vm, "spec", "memory_mib")))),
        ("Labels", cell(fmt_labels(dig(vm, "spec", "labels")))),
        ("Image", cell(dig(vm, "spec", "image"))),
        ("Disks", cell(", ".join(str(d.get("volume")) for d in dig(vm, "spec", "disks") or []))),
        ("PID", cell(dig(vm, "status", "runtime", "qemu.pid"))),
        ("QEMU", cell(dig(vm, "status", "runtime", "qemu.version"))),
        ("Accel", cell(dig(vm, "status", "runtime", "qemu.accel"))),
        ("VNC", cell(dig(vm, "status", "runtime", "qemu.vnc"))),
        ("Started", cell(fmt_time(dig(vm, "status", "started_at"), now))),
        ("Generation", cell(f"{generation} (observed {observed})" if generation else None)),
        ("Revision", cell(f"{vm.get('mod_revision')} (created at {vm.get('create_revision')})")),
        ("Created", cell(fmt_time(vm.get("created_at"), now))),
        ("Updated", cell(fmt_time(vm.get("updated_at"), now))),
    ]
    emit(state.out, kv_view(rows))


@vm_app.command("create")
def vm_create(
    ctx: typer.Context,
    name: NameArg,
    vcpus: VcpusOpt = None,
    memory: MemoryOpt = None,
    label: LabelsOpt = None,
    restart_policy: RestartPolicyOpt = None,
    start: Annotated[
        bool, typer.Option("--start/--no-start", help="Start the VM once it is created.")
    ] = True,
    image: Annotated[
        str | None,
        typer.Option("--image", help="Boot from a copy of this image (`corral image ls`)."),
    ] = None,
    disk: Annotated[
        int | None,
        typer.Option(
            "--disk",
            parser=parse_gib,
            metavar="SIZE",
            help="Size of the boot disk made from --image: 10G (default: the image's size).",
            show_default=False,
        ),
    ] = None,
    full: Annotated[
        bool, typer.Option("--full", help="A full copy of the image instead of a linked clone.")
    ] = False,
    pool: Annotated[
        str | None,
        typer.Option(
            "--pool",
            help="Pool of the boot disk made from --image (default: local); with --template "
            "--full: the pool to copy its disks into.",
            show_default=False,
        ),
    ] = None,
    volume: Annotated[
        list[str] | None,
        typer.Option("--volume", help="Attach this existing volume too; repeatable."),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option(
            "--template",
            help="Make it from this template (`corral template ls`): linked clones of its "
            "disks (--full: copies), its hardware, new MAC addresses.",
        ),
    ] = None,
    nics: Annotated[
        int,
        typer.Option("--nics", min=0, max=8, help="Network cards (virtio, user networking)."),
    ] = 0,
    group: Annotated[
        str | None, typer.Option("--group", help="Placement group (`corral group ls`).")
    ] = None,
    node_selector: Annotated[
        list[str] | None,
        typer.Option(
            "--node-selector",
            metavar="KEY=VALUE",
            help="Only hosts with this label value; repeatable.",
            show_default=False,
        ),
    ] = None,
    require_label: Annotated[
        list[str] | None,
        typer.Option(
            "--require-label",
            metavar="KEY",
            help="Only hosts carrying this label; repeatable.",
            show_default=False,
        ),
    ] = None,
    affinity_vm: Annotated[
        str | None, typer.Option("--affinity-vm", help="Run on the host of this VM.")
    ] = None,
    spread_over: Annotated[
        str | None,
        typer.Option("--spread-over", metavar="LABEL", help="Spread the group over zone|rack."),
    ] = None,
    priority: Annotated[
        int | None, typer.Option("--priority", min=0, max=1000, help="Higher is placed first.")
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option("--policy", metavar="spread|binpack|balanced", help="Override the cluster's."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Show the host it would go to and why; create nothing."),
    ] = False,
    to: Annotated[
        str | None,
        typer.Option(
            "--to", metavar="NODE", help="With --template --full: copy its disks to this host."
        ),
    ] = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    output: OutputOpt = None,
) -> None:
    """Create a VM (and start it, unless --no-start); waits for the task by default."""
    state = get_state(ctx)
    if to is not None and template is None:
        raise typer.BadParameter(
            "only with --template (to copy its disks there)", param_hint="--to"
        )
    if pool is not None and image is None and template is None:
        raise typer.BadParameter(
            "only with --image (the boot disk's pool) or --template --full (where its disks "
            "are copied); attach a volume of any pool with --volume",
            param_hint="--pool",
        )
    if template is not None:
        from corral.cli.template import instantiate

        instantiate(
            ctx,
            template,
            name,
            start=start,
            full=full,
            labels=label,
            wait=wait,
            timeout=timeout,
            output=output,
            to=to,
            pool=pool,
        )
        return
    spec: dict[str, Any] = {"name": name, "power_state": "running" if start else "stopped"}
    if group is not None:
        spec["group"] = group
    if node_selector:
        spec["node_selector"] = parse_labels(node_selector)
    if require_label:
        spec["required_labels"] = list(require_label)
    if affinity_vm is not None:
        spec["affinity_vm"] = affinity_vm
    if spread_over is not None:
        spec["spread_over"] = spread_over
    if priority is not None:
        spec["priority"] = priority
    if policy is not None:
        spec["placement_policy"] = policy
    if image is not None:
        spec["image"] = image
        spec["pool"] = pool or "local"
        spec["full_clone"] = full
    if disk is not None:
        spec["disk_gib"] = disk
    if volume:
        spec["disks"] = [{"volume": v} for v in volume]
    if nics:
        spec["nics"] = [{} for _ in range(nics)]
    if vcpus is not None:
        spec["vcpus"] = vcpus
    if memory is not None:
        spec["memory_mib"] = memory
    if restart_policy is not None:
        spec["restart_policy"] = restart_policy.value
    labels = parse_labels(label)
    if labels:
        spec["labels"] = labels
    if dry_run:
        answer: Any = state.client().create_vm(spec, dry_run=True)
        if state.wants_json(output):
            print_json(answer)
            return
        typer.echo(f"dry run: {answer.get('message', '')} (nothing was created)")
        emit(state.out, plan_table(answer.get("placement") or {}))
        return
    result = state.client().create_vm(spec)
    _finish(state, result, name=name, verb="create", wait=wait, timeout=timeout, output=output)


def plan_table(plan: dict[str, Any]) -> Any:
    """The `vm why` table: each host with the filter that rejected it, or its scores."""
    table = new_table("NODE", "OUTCOME", "FILTER", "REASON / SCORES", "TOTAL")
    for row in plan.get("nodes") or []:
        scores = row.get("scores") or {}
        detail = row.get("reason") or ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
        total = row.get("total")
        table.add_row(
            cell(row.get("node")),
            cell(row.get("outcome")),
            cell(row.get("filter")),
            cell(detail),
            cell(f"{total:.3f}" if isinstance(total, int | float) else None),
        )
    return table


def omitted_line(plan: dict[str, Any]) -> str | None:
    """The line under the `vm why` table naming the hosts a stored plan left out."""
    left = plan.get("omitted")
    if not left:
        return None
    parts = [f"{left['feasible']} feasible (lower totals)"] if left.get("feasible") else []
    parts += [f"{n} rejected by {f}" for f, n in (left.get("rejected") or {}).items()]
    return (
        f"not listed: {', '.join(parts)} (a stored plan keeps the best hosts and the first "
        "few each filter rejected)"
    )


@vm_app.command("why")
def vm_why(ctx: typer.Context, name: NameArg, output: OutputOpt = None) -> None:
    """Why the VM is on its host, or why it is pending: each host with the filter that
    rejected it, or its scores (on a big cluster: the best hosts and a few per filter)."""
    state = get_state(ctx)
    answer = state.client().vm_placement(name)
    if state.wants_json(output):
        print_json(answer)
        return
    where = answer.get("node") or "no node"
    typer.echo(f"vm {name} is {answer.get('state')} on {where}: {answer.get('message', '')}")
    plan = answer.get("plan") or {}
    when = "computed now" if answer.get("computed_now") else f"decided {answer.get('decided_at')}"
    typer.echo(f"policy {plan.get('policy')}, {when}")
    emit(state.out, plan_table(plan))
    left = omitted_line(plan)
    if left:
        typer.echo(left)


@vm_app.command("edit")
def vm_edit(
    ctx: typer.Context,
    name: NameArg,
    vcpus: VcpusOpt = None,
    memory: MemoryOpt = None,
    label: LabelsOpt = None,
    restart_policy: RestartPolicyOpt = None,
    remove_label: Annotated[
        list[str] | None,
        typer.Option(
            "--remove-label",
            metavar="KEY",
            help="A label to remove; repeatable.",
            show_default=False,
        ),
    ] = None,
    if_match: Annotated[
        int | None,
        typer.Option(
            "--if-match",
            metavar="REVISION",
            help="Only if the VM is still at this mod_revision (else exit 4).",
            show_default=False,
        ),
    ] = None,
    output: OutputOpt = None,
) -> None:
    """Change a VM's spec (a JSON merge patch): vCPUs, memory, labels, restart policy."""
    state = get_state(ctx)
    patch: dict[str, Any] = {}
    if vcpus is not None:
        patch["vcpus"] = vcpus
    if memory is not None:
        patch["memory_mib"] = memory
    if restart_policy is not None:
        patch["restart_policy"] = restart_policy.value
    labels: dict[str, str | None] = dict(parse_labels(label))
    for key in parse_label_keys(remove_label):
        if key in labels:
            raise typer.BadParameter(
                f"label {key!r} is both set with --label and removed", param_hint="'--remove-label'"
            )
        labels[key] = None
    if labels:
        patch["labels"] = labels
    if not patch:
        raise typer.BadParameter(
            "nothing to change; give --vcpus, --memory, --label, --remove-label or "
            "--restart-policy",
            param_hint="'vm edit'",
        )
    vm = state.client().patch_vm(name, patch, if_match=if_match)
    if state.wants_json(output):
        print_json(vm)
        return
    typer.echo(
        f"vm {vm.get('name', name)} updated (generation {vm.get('generation', '?')}, "
        f"revision {vm.get('mod_revision', '?')})"
    )


def _action(
    ctx: typer.Context,
    name: str,
    action: str,
    *,
    body: dict[str, Any] | None,
    wait: bool,
    timeout: float | None,
    output: OutputFormat | None,
) -> None:
    state = get_state(ctx)
    result = state.client().vm_action(name, action, body)
    _finish(state, result, name=name, verb=action, wait=wait, timeout=timeout, output=output)


@vm_app.command("start")
def vm_start(
    ctx: typer.Context,
    name: NameArg,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    output: OutputOpt = None,
) -> None:
    """Start a stopped or crashed VM (placing it on a node if it has none); resumes a paused
    one."""
    _action(ctx, name, "start", body=None, wait=wait, timeout=timeout, output=output)


@vm_app.command("stop")
def vm_stop(
    ctx: typer.Context,
    name: NameArg,
    force: Annotated[
        bool, typer.Option("--force", help="Power off at once instead of shutting down cleanly.")
    ] = False,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    output: OutputOpt = None,
) -> None:
    """Stop a VM: a clean shutdown, or a hard power-off with --force."""
    body = {"force": True} if force else None
    _action(ctx, name, "stop", body=body, wait=wait, timeout=timeout, output=output)


@vm_app.command("reboot")
def vm_reboot(
    ctx: typer.Context,
    name: NameArg,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    output: OutputOpt = None,
) -> None:
    """Reboot a running VM."""
    _action(ctx, name, "reboot", body=None, wait=wait, timeout=timeout, output=output)


@vm_app.command("pause")
def vm_pause(
    ctx: typer.Context,
    name: NameArg,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    output: OutputOpt = None,
) -> None:
    """Freeze a running VM's vCPUs (it keeps its memory and its node); `vm resume` goes on."""
    _action(ctx, name, "pause", body=None, wait=wait, timeout=timeout, output=output)


@vm_app.command("resume")
def vm_resume(
    ctx: typer.Context,
    name: NameArg,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    output: OutputOpt = None,
) -> None:
    """Let a paused VM run on from where it was (a running VM stays as it is)."""
    _action(ctx, name, "resume", body=None, wait=wait, timeout=timeout, output=output)


@vm_app.command("delete")
def vm_delete(
    ctx: typer.Context,
    name: NameArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    with_disks: Annotated[
        bool, typer.Option("--with-disks", help="Delete its volumes too (else they are kept).")
    ] = False,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    output: OutputOpt = None,
) -> None:
    """Delete a VM (asks first unless --yes); its volumes stay unless --with-disks."""
    state = get_state(ctx)
    if not yes:
        vm = state.client().get_vm(name)  # a missing VM exits 3 before any question
        where = dig(vm, "status", "node")
        detail = f" ({dig(vm, 'status', 'state')}" + (f" on {where})" if where else ")")
        also = " and its disks" if with_disks else ""
        typer.confirm(f"delete vm {name}{detail}{also}?", abort=True, err=True)
    result = state.client().delete_vm(name, with_disks=with_disks)

    def deleted(vm: ApiObject | None, task: ApiObject | None) -> str:
        suffix = f" (task {short_id(task.get('id'))})" if task is not None else ""
        return f"vm {name} deleted{suffix}"

    finish_action(
        state,
        result,
        wait=wait,
        timeout=timeout,
        json_output=state.wants_json(output),
        refresh=vm_refresher(state, name),
        success=deleted,
        accepted=f"delete of vm {name} accepted",
    )
