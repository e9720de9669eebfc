"""`corral token create|ls|revoke` and `corral cluster set`, `corral node remove`."""

from __future__ import annotations

from typing import Annotated

import typer

from corral.cli.cluster import cluster_app, node_app
from corral.cli.context import get_state
from corral.cli.params import OutputOpt
from corral.cli.render import (
    cell,
    dig,
    emit,
    fmt_age,
    new_table,
    parse_time,
    print_json,
    state_cell,
)

__all__ = ["token_app"]

token_app = typer.Typer(name="token", help="Join tokens for new hosts.", no_args_is_help=True)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str) -> int:
    """`90s`, `30m`, `1h`, `7d` or plain seconds; BadParameter naming the rule otherwise."""
    text = value.strip().lower()
    unit = text[-1:] if text[-1:] in _UNITS else "s"
    number = text[:-1] if text[-1:] in _UNITS else text
    try:
        seconds = int(float(number) * _UNITS[unit])
    except ValueError:
        raise typer.BadParameter(f"{value!r}: use a duration like 30m, 1h or 7d") from None
    if seconds <= 0:
        raise typer.BadParameter(f"{value!r}: must be more than 0")
    return seconds


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    ttl: Annotated[str, typer.Option("--ttl", help="How long it stays valid: 30m, 1h, 7d.")] = "1h",
    uses: Annotated[
        int | None, typer.Option("--uses", min=1, help="Joins allowed (default: any).")
    ] = None,
    role: Annotated[
        str, typer.Option("--role", help="server (may also join compute-only) or compute.")
    ] = "server",
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    output: OutputOpt = None,
) -> None:
    """Create a join token; prints it once (only its hash is stored)."""
    if role not in ("server", "compute"):
        raise typer.BadParameter("must be server or compute", param_hint="--role")
    state = get_state(ctx)
    token = state.client().create_token(
        ttl_s=parse_duration(ttl), uses=uses, role=role, description=description
    )
    if state.wants_json(output):
        print_json(token)
        return
    typer.echo(token["secret"])
    typer.echo(
        f"token {token['id']}: role {role}, expires {dig(token, 'spec', 'expires_at')}, "
        f"uses {uses if uses is not None else 'unlimited'}. It is shown only now.",
        err=True,
    )


@token_app.command("ls")
def token_ls(ctx: typer.Context, output: OutputOpt = None) -> None:
    """List tokens (never their secrets)."""
    state = get_state(ctx)
    page = state.client().list_tokens()
    if state.wants_json(output):
        print_json(page)
        return
    now = state.now()
    table = new_table("ID", "ROLE", "STATE", "USES LEFT", "EXPIRES IN", "USED BY", "DESCRIPTION")
    for t in page["items"]:
        expires = parse_time(dig(t, "spec", "expires_at"))
        revoked = dig(t, "status", "revoked")
        left = dig(t, "status", "uses_left")
        if revoked:
            token_state = "revoked"
        elif expires is None or expires <= now:
            token_state = "expired"
        else:
            token_state = "used up" if left == 0 else "valid"
        # fmt_age of the moment as far in the past as the expiry is in the future.
        remaining = fmt_age(now - (expires - now), now) if expires and expires > now else "-"
        table.add_row(
            cell(t.get("id")),
            cell(dig(t, "spec", "role")),
            state_cell(token_state),
            cell("unlimited" if left is None else left),
            cell(remaining),
            cell(", ".join(dig(t, "status", "used_by") or [])),
            cell(dig(t, "spec", "description")),
        )
    emit(state.out, table)


@token_app.command("revoke")
def token_revoke(ctx: typer.Context, token_id: str, output: OutputOpt = None) -> None:
    """Revoke a token: later joins with it are refused."""
    state = get_state(ctx)
    token = state.client().revoke_token(token_id.partition(".")[0])
    if state.wants_json(output):
        print_json(token)
        return
    typer.echo(f"token {token['id']} revoked")


@cluster_app.command("set")
def cluster_set(
    ctx: typer.Context,
    desired_voters: Annotated[
        int | None, typer.Option("--desired-voters", help="etcd voters to keep: 1, 3 or 5.")
    ] = None,
    server_dead_grace: Annotated[
        str | None,
        typer.Option("--server-dead-grace", help="How long a dead server keeps its membership."),
    ] = None,
    output: OutputOpt = None,
) -> None:
    """Change cluster-wide settings."""
    patch: dict[str, object] = {}
    if desired_voters is not None:
        patch["desired_voters"] = desired_voters
    if server_dead_grace is not None:
        patch["server_dead_grace_s"] = float(parse_duration(server_dead_grace))
    if not patch:
        raise typer.BadParameter("give at least one setting, e.g. --desired-voters 3")
    state = get_state(ctx)
    info = state.client().configure_cluster(patch)
    if state.wants_json(output):
        print_json(info)
        return
    config = info.get("config") or {}
    typer.echo(
        f"desired_voters={config.get('desired_voters')} "
        f"server_dead_grace_s={config.get('server_dead_grace_s')}"
    )


@node_app.command("remove")
def node_remove(ctx: typer.Context, name: str, output: OutputOpt = None) -> None:
    """Retire a host whose agent no longer runs; its etcd member is removed too."""
    state = get_state(ctx)
    node = state.client().remove_node(name)
    if state.wants_json(output):
        print_json(node)
        return
    typer.echo(f"node {name} removed ({dig(node, 'status', 'state')})")
