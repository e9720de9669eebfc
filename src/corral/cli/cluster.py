"""`corral cluster status` and `corral node ls|show`: the hosts and the control plane."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated

import typer
from rich.console import Group
from rich.text import Text

from corral.cli.context import get_state
from corral.cli.params import OutputOpt
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
from corral.client import ApiObject

__all__ = ["cluster_app", "node_app"]

cluster_app = typer.Typer(name="cluster", help="The cluster as a whole.", no_args_is_help=True)
node_app = typer.Typer(name="node", help="Hosts that run corral agents.", no_args_is_help=True)


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
