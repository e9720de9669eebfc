"""`corral cluster status` and `corral node ls|show`: the hosts and the control plane."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.text import Text

from corral.cli.context import get_state
from corral.cli.params import OutputOpt, TimeoutOpt, WaitOpt, parse_memory
from corral.cli.render import (
    cell,
    dig,
    emit,
    fmt_age,
    fmt_gib,
    fmt_labels,
    fmt_list,
    fmt_mib,
    fmt_time,
    kv_view,
    new_table,
    print_json,
    state_cell,
)
from corral.cli.waiting import finish_action
from corral.client import ApiObject

__all__ = ["cluster_app", "node_app"]

cluster_app = typer.Typer(name="cluster", help="The cluster as a whole.", no_args_is_help=True)
node_app = typer.Typer(name="node", help="Hosts that run corral agents.", no_args_is_help=True)


NodeArg = Annotated[str, typer.Argument(metavar="NAME", help="The node's name.")]


def _used_of(used: object, total: object, fmt: Callable[[object], str] = str) -> str:
    """`used/total` with both sides formatted by `fmt` ("-" for unknown parts)."""
    return f"{fmt(used) if used is not None else '-'}/{fmt(total) if total is not None else '-'}"


def _lag_cell(lag: object) -> Text:
    """Raft entries a member is behind the leader: "-" when unknown, red past 1,000."""
    if not isinstance(lag, int):
        return cell(None)
    return Text(str(lag), style="red" if lag > 1000 else "yellow" if lag > 0 else "")


@cluster_app.command("status")
def cluster_status(ctx: typer.Context, output: OutputOpt = None) -> None:
    """Cluster id, leader and term, revision, node and VM counts, and the etcd members."""
    state = get_state(ctx)
    info = state.client().cluster()
    if state.wants_json(output):
        print_json(info)
        return
    now = state.now()
    leader = info.get("leader")
    if isinstance(leader, dict):
        since = fmt_age(leader.get("since"), now)
        leader_text = cell(f"{leader.get('node')} (since {leader.get('since')}, {since} ago)")
    else:
        leader_text = Text("none: the control plane has no leader (no quorum?)", style="red")
    nodes, vms = info.get("nodes") or {}, info.get("vms") or {}
    summary = kv_view(
        [
            ("Cluster", cell(f"{info.get('name', '')} {info.get('id', '')}".strip())),
            ("Version", cell(info.get("version"))),
            ("Leader", leader_text),
            ("Term", cell(dig(info, "leader", "term"))),
            ("Revision", cell(info.get("revision"))),
            ("Nodes", cell(f"{nodes.get('ready', '-')}/{nodes.get('total', '-')} ready")),
            ("VMs", cell(f"{vms.get('running', '-')}/{vms.get('total', '-')} running")),
            ("CA", cell(info.get("ca_fingerprint"))),
        ]
    )
    members = new_table(
        "MEMBER", "ID", "ROLE", "HEALTH", "LEADER", "LAG", "PEER URLS", "CLIENT URLS"
    )
    for member in info.get("members") or []:
        members.add_row(
            cell(member.get("name")),
            cell(member.get("id")),
            cell("learner" if member.get("is_learner") else "voter"),
            state_cell("healthy" if member.get("healthy") else "unhealthy"),
            cell("*" if member.get("is_leader") else ""),
            _lag_cell(member.get("lag")),
            cell(fmt_list(member.get("peer_urls"))),
            cell(fmt_list(member.get("client_urls"))),
        )
    emit(state.out, Group(summary, Text(""), members))


@node_app.command("ls")
def node_ls(
    ctx: typer.Context,
    label: Annotated[
        str | None,
        typer.Option("--label", "-l", metavar="SELECTOR", help="Label selector, e.g. rack=a1."),
    ] = None,
    node_state: Annotated[
        str | None, typer.Option("--state", help="Only nodes in this state (ready, down, ...).")
    ] = None,
    output: OutputOpt = None,
) -> None:
    """List nodes: NAME, STATE, ROLES, CPUS and MEMORY (allocated/total), DISK, VMS, HEARTBEAT."""
    state = get_state(ctx)
    pager = state.client().iter_nodes(label=label, state=node_state)
    items = list(pager)
    if state.wants_json(output):
        print_json({"items": items, "next_cursor": None, "revision": pager.revision})
        return
    if not items:
        typer.echo("no nodes found", err=True)
        return
    now = state.now()
    table = new_table(
        "NAME", "STATE", "ROLES", "GOSSIP", "CPUS", "MEMORY", "DISK FREE", "VMS", "HEARTBEAT"
    )
    for node in items:
        inventory = dig(node, "status", "inventory") or {}
        allocated = dig(node, "status", "allocated") or {}
        heartbeat = fmt_age(dig(node, "status", "heartbeat_at"), now)
        table.add_row(
            cell(node.get("name")),
            state_cell(dig(node, "status", "state")),
            cell(fmt_list(dig(node, "spec", "roles"))),
            state_cell(dig(node, "status", "gossip")),
            cell(_used_of(allocated.get("vcpus"), inventory.get("cpus"))),
            cell(_used_of(allocated.get("memory_mib"), inventory.get("memory_mib"), fmt_mib)),
            cell(_used_of(inventory.get("disk_free_gib"), inventory.get("disk_gib"), fmt_gib)),
            cell(allocated.get("vms")),
            cell(f"{heartbeat} ago" if heartbeat != "-" else None),
        )
    emit(state.out, table)


def _node_rows(node: ApiObject, now: datetime) -> list[tuple[str, Text]]:
    inventory = dig(node, "status", "inventory") or {}
    allocated = dig(node, "status", "allocated") or {}
    return [
        ("Name", cell(node.get("name"))),
        ("ID", cell(node.get("id"))),
        ("State", state_cell(dig(node, "status", "state"))),
        ("Message", cell(dig(node, "status", "message"))),
        ("Gossip", cell(dig(node, "status", "gossip"))),
        ("Address", cell(dig(node, "status", "address"))),
        ("gRPC", cell(dig(node, "status", "grpc_address") or None)),
        ("etcd peer", cell(dig(node, "status", "etcd_peer_url") or None)),
        ("Roles", cell(fmt_list(dig(node, "spec", "roles")))),
        ("Labels", cell(fmt_labels(dig(node, "spec", "labels")))),
        ("Driver", cell(dig(node, "status", "driver"))),
        ("Heartbeat", cell(fmt_time(dig(node, "status", "heartbeat_at"), now))),
        ("Hostname", cell(inventory.get("hostname"))),
        ("Kernel", cell(inventory.get("kernel"))),
        ("corral version", cell(inventory.get("corral_version"))),
        (
            "CPUs (allocated/total)",
            cell(_used_of(allocated.get("vcpus"), inventory.get("cpus"))),
        ),
        (
            "Memory (allocated/total)",
            cell(_used_of(allocated.get("memory_mib"), inventory.get("memory_mib"), fmt_mib)),
        ),
        (
            "Disk (free/total)",
            cell(_used_of(inventory.get("disk_free_gib"), inventory.get("disk_gib"), fmt_gib)),
        ),
        ("VMs", cell(allocated.get("vms"))),
        ("Created", cell(fmt_time(node.get("created_at"), now))),
    ]


@node_app.command("show")
def node_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The node's name.")],
    output: OutputOpt = None,
) -> None:
    """Show one node: state, address, roles, inventory and what is allocated on it."""
    state = get_state(ctx)
    node = state.client().get_node(name)
    if state.wants_json(output):
        print_json(node)
        return
    emit(state.out, kv_view(_node_rows(node, state.now())))


# -- placement: maintenance, drain, capacity, rebalance ---------------------------------------


def _moves_table(moves: list[dict[str, Any]]) -> Any:
    table = new_table("VM", "FROM", "TO", "IMBALANCE AFTER")
    for m in moves:
        after = m.get("score_after")
        table.add_row(
            cell(m.get("vm")),
            cell(m.get("source")),
            cell(m.get("target")),
            cell(f"{after:.4f}" if isinstance(after, int | float) else None),
        )
    return table


@node_app.command("cordon")
def node_cordon(ctx: typer.Context, name: NodeArg) -> None:
    """Stop placing new VMs on a node (its VMs stay)."""
    get_state(ctx).client().node_action(name, "cordon")
    typer.echo(f"node {name} cordoned: it takes no new VMs")


@node_app.command("uncordon")
def node_uncordon(ctx: typer.Context, name: NodeArg) -> None:
    """Let a cordoned node take new VMs again."""
    get_state(ctx).client().node_action(name, "uncordon")
    typer.echo(f"node {name} uncordoned")


@node_app.command("undrain")
def node_undrain(ctx: typer.Context, name: NodeArg) -> None:
    """Uncordon a node and stop its drain (moves under way finish)."""
    get_state(ctx).client().node_action(name, "undrain")
    typer.echo(f"node {name} takes VMs again (its drain, if any, is cancelled)")


@node_app.command("maintenance")
def node_maintenance(
    ctx: typer.Context,
    mode: Annotated[str, typer.Argument(metavar="on|off", help="Enter or leave maintenance.")],
    name: NodeArg,
) -> None:
    """Maintenance on (the node must hold no VMs: drain it first) or off (back in service)."""
    if mode not in ("on", "off"):
        raise typer.BadParameter("must be on or off", param_hint="'on|off'")
    get_state(ctx).client().node_action(name, f"maintenance/{mode}")
    typer.echo(f"node {name} maintenance {mode}")


@node_app.command("drain")
def node_drain(
    ctx: typer.Context,
    name: NodeArg,
    force: Annotated[
        bool,
        typer.Option("--force", help="VMs that cannot move are stopped and left pending."),
    ] = False,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, max=32, help="Moves at the same time.")
    ] = 2,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only show the moves and the blockers.")
    ] = False,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    output: OutputOpt = None,
) -> None:
    """Cordon a node and move every VM away (a task with progress; cancel with
    `corral task cancel ID` or `corral node undrain`). Blockers are reported first."""
    state = get_state(ctx)
    client = state.client()
    body = {"force": force, "concurrency": concurrency}
    answer = client.node_action(name, "drain", body, dry_run=dry_run)
    plan = answer.get("plan") or {}
    if dry_run or not wait:
        if state.wants_json(output):
            print_json(answer)
            return
        emit(state.out, _moves_table([{**m, "source": name} for m in plan.get("moves", [])]))
        for b in plan.get("blockers", []):
            typer.echo(f"blocker: vm {b.get('vm')}: {b.get('blocker')}", err=True)
        task = answer.get("task")
        if task:
            typer.echo(f"drain of node {name} started: corral task watch {task.get('id')}")
        return

    def refresh() -> ApiObject | None:
        return client.get_node(name)

    def done(node: ApiObject | None, task: ApiObject | None) -> str:
        result = dig(task, "status", "result") or {} if task else {}
        moved = sum(
            1 for m in (result.get("moves") or {}).values() if m.get("state") == "succeeded"
        )
        evicted = len(result.get("evicted") or {})
        return f"node {name} drained: {moved} vms moved, {evicted} stopped and pending"

    finish_action(
        state,
        {"object": answer.get("object"), "task": answer.get("task")},
        wait=wait,
        timeout=timeout,
        json_output=state.wants_json(output),
        refresh=refresh,
        success=done,
        accepted=f"drain of node {name} accepted",
    )


@cluster_app.command("capacity")
def cluster_capacity(
    ctx: typer.Context,
    vcpus: Annotated[int, typer.Option("--vcpus", min=1, help="vCPUs of the shape.")] = 1,
    memory: Annotated[
        int, typer.Option("--memory", "-m", parser=parse_memory, metavar="SIZE")
    ] = 512,
    tolerate_failures: Annotated[
        int, typer.Option("--tolerate-failures", min=0, help="Keep room for N host failures.")
    ] = 0,
    output: OutputOpt = None,
) -> None:
    """How many more VMs of this shape fit, per host and in total (N+k with
    --tolerate-failures)."""
    state = get_state(ctx)
    answer = state.client().capacity(vcpus, memory, tolerate_failures)
    if state.wants_json(output):
        print_json(answer)
        return
    table = new_table("NODE", "FITS", "VCPUS USED/CAP", "MEMORY USED/CAP", "NOTE")
    for row in answer.get("nodes") or []:
        table.add_row(
            cell(row.get("node")),
            cell(row.get("fits")),
            cell(_used_of(dig(row, "vcpus", "used"), dig(row, "vcpus", "capacity"))),
            cell(
                _used_of(
                    dig(row, "memory_mib", "used"), dig(row, "memory_mib", "capacity"), fmt_mib
                )
            ),
            cell(row.get("reason")),
        )
    emit(state.out, table)
    typer.echo(f"total: {answer.get('total')} vms of {vcpus} vCPU / {fmt_mib(memory)}")
    if tolerate_failures:
        typer.echo(
            f"tolerating {tolerate_failures} host failure(s): "
            f"{answer.get('total_tolerating_failures')}"
        )


@cluster_app.command("rebalance")
def cluster_rebalance(
    ctx: typer.Context,
    plan_only: Annotated[bool, typer.Option("--plan", help="Print the moves only.")] = False,
    apply: Annotated[bool, typer.Option("--apply", help="Run the moves as a task.")] = False,
    max_moves: Annotated[int, typer.Option("--max-moves", min=0, max=100)] = 4,
    min_gain: Annotated[float, typer.Option("--min-gain", min=0, max=1)] = 0.01,
    output: OutputOpt = None,
) -> None:
    """Live-migrate VMs to even out the hosts: --plan prints the moves and the imbalance score
    before/after; --apply runs them as a task."""
    if plan_only == apply:
        raise typer.BadParameter("give --plan or --apply", param_hint="'--plan'")
    state = get_state(ctx)
    answer = state.client().rebalance(
        {"max_moves": max_moves, "min_gain": min_gain}, dry_run=plan_only
    )
    if state.wants_json(output):
        print_json(answer)
        return
    plan = answer.get("plan") or {}
    moves = plan.get("moves") or []
    typer.echo(
        f"imbalance {plan.get('score_before', 0):.4f} -> {plan.get('score_after', 0):.4f} "
        f"with {len(moves)} moves"
    )
    if moves:
        emit(state.out, _moves_table(moves))
    task = answer.get("task")
    if task:
        typer.echo(f"rebalance started: corral task watch {task.get('id')}")
