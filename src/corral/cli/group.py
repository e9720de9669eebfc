"""`corral group create|ls|show|delete`: placement groups (Nova server groups)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

from corral.cli.context import get_state
from corral.cli.params import OutputOpt
from corral.cli.render import cell, dig, emit, fmt_age, kv_view, new_table, print_json

__all__ = ["group_app"]

group_app = typer.Typer(
    name="group",
    help="Placement groups: keep VMs apart (anti-affinity) or together (affinity).",
    no_args_is_help=True,
)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The group's name.")]


class Policy(StrEnum):
    anti_affinity = "anti-affinity"
    affinity = "affinity"
    soft_anti_affinity = "soft-anti-affinity"
    soft_affinity = "soft-affinity"


@group_app.command("create")
def group_create(
    ctx: typer.Context,
    name: NameArg,
    anti_affinity: Annotated[
        bool, typer.Option("--anti-affinity", help="Members on different hosts (hard).")
    ] = False,
    affinity: Annotated[
        bool, typer.Option("--affinity", help="Members on the same host (hard).")
    ] = False,
    policy: Annotated[
        Policy | None,
        typer.Option("--policy", help="Any policy, soft ones included.", show_default=False),
    ] = None,
    max_per_node: Annotated[
        int, typer.Option("--max-per-node", min=1, help="Anti-affinity: members per host.")
    ] = 1,
    weight: Annotated[
        float, typer.Option("--weight", min=0, help="Soft policies: how much they count.")
    ] = 1.0,
    output: OutputOpt = None,
) -> None:
    """Create a placement group; VMs join it with `corral vm create --group NAME`."""
    chosen = [p for p, on in (("anti-affinity", anti_affinity), ("affinity", affinity)) if on]
    if policy is not None:
        chosen.append(policy.value)
    if len(chosen) > 1:
        raise typer.BadParameter(
            "give one of --anti-affinity, --affinity or --policy", param_hint="'--policy'"
        )
    body: dict[str, Any] = {
        "name": name,
        "policy": chosen[0] if chosen else "anti-affinity",
        "max_per_node": max_per_node,
        "weight": weight,
    }
    state = get_state(ctx)
    group = state.client().create_object("groups", body)
    if state.wants_json(output):
        print_json(group)
        return
    typer.echo(
        f"group {name} created ({dig(group, 'spec', 'policy')}, "
        f"max {dig(group, 'spec', 'max_per_node')} per node)"
    )


@group_app.command("ls")
def group_ls(ctx: typer.Context, output: OutputOpt = None) -> None:
    """List groups: NAME, POLICY, MAX/NODE, MEMBERS, AGE."""
    state = get_state(ctx)
    page = state.client().list_objects("groups")
    if state.wants_json(output):
        print_json(page)
        return
    if not page["items"]:
        typer.echo("no groups found", err=True)
        return
    now = state.now()
    table = new_table("NAME", "POLICY", "MAX/NODE", "WEIGHT", "MEMBERS", "AGE")
    for g in page["items"]:
        table.add_row(
            cell(g.get("name")),
            cell(dig(g, "spec", "policy")),
            cell(dig(g, "spec", "max_per_node")),
            cell(dig(g, "spec", "weight")),
            cell(len(dig(g, "status", "members") or [])),
            cell(fmt_age(g.get("created_at"), now)),
        )
    emit(state.out, table)


@group_app.command("show")
def group_show(ctx: typer.Context, name: NameArg, output: OutputOpt = None) -> None:
    """Show a group and where each member runs."""
    state = get_state(ctx)
    g = state.client().get_object("groups", name)
    if state.wants_json(output):
        print_json(g)
        return
    nodes = dig(g, "status", "nodes") or {}
    members = ", ".join(f"{m} ({nodes.get(m) or 'pending'})" for m in sorted(nodes)) or "-"
    emit(
        state.out,
        kv_view(
            [
                ("Name", cell(g.get("name"))),
                ("Policy", cell(dig(g, "spec", "policy"))),
                ("Max per node", cell(dig(g, "spec", "max_per_node"))),
                ("Weight", cell(dig(g, "spec", "weight"))),
                ("Members", cell(members)),
            ]
        ),
    )


@group_app.command("delete")
def group_delete(ctx: typer.Context, name: NameArg, output: OutputOpt = None) -> None:
    """Delete an empty group."""
    state = get_state(ctx)
    g = state.client().delete_object("groups", name)
    if state.wants_json(output):
        print_json(g)
        return
    typer.echo(f"group {name} deleted")
