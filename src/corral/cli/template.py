"""`corral template create|ls|show|delete` (and `corral vm create --template`)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from corral.cli.context import get_state
from corral.cli.params import LabelsOpt, OutputOpt, parse_labels
from corral.cli.render import cell, dig, emit, fmt_age, kv_view, new_table, print_json
from corral.cli.snapshot import finish_new_vm

__all__ = ["instantiate", "template_app"]

template_app = typer.Typer(
    name="template", help="Templates: read-only VMs to create others from.", no_args_is_help=True
)
NameArg = Annotated[str, typer.Argument(metavar="NAME", show_default=False)]


@template_app.command("create")
def template_create(
    ctx: typer.Context,
    name: NameArg,
    source: Annotated[
        str, typer.Option("--from", metavar="VM", help="The stopped VM that becomes the template.")
    ],
    labels: LabelsOpt = None,
    output: OutputOpt = None,
) -> None:
    """Turn a stopped VM into a read-only template (the VM goes; its disks stay, read-only)."""
    state = get_state(ctx)
    body: dict[str, Any] = {"name": name, "vm": source}
    if labels:
        body["labels"] = parse_labels(labels)
    obj = state.client().create_object("templates", body)
    if state.wants_json(output):
        print_json(obj)
        return
    disks = ", ".join(str(d.get("volume")) for d in dig(obj, "spec", "vm", "disks") or [])
    typer.echo(f"template {name} created from vm {source} (read-only disks: {disks})")


@template_app.command("ls")
def template_ls(ctx: typer.Context, output: OutputOpt = None) -> None:
    """List templates: NAME, FROM VM, VCPUS, MEMORY, DISKS, AGE."""
    state = get_state(ctx)
    page = state.client().list_objects("templates")
    if state.wants_json(output):
        print_json(page)
        return
    if not page["items"]:
        typer.echo("no templates found", err=True)
        return
    table = new_table("NAME", "FROM VM", "VCPUS", "MEMORY", "DISKS", "AGE")
    for t in page["items"]:
        table.add_row(
            cell(t.get("name")),
            cell(dig(t, "spec", "source_vm")),
            cell(dig(t, "spec", "vm", "vcpus")),
            cell(f"{dig(t, 'spec', 'vm', 'memory_mib')} MiB"),
            cell(", ".join(str(d.get("volume")) for d in dig(t, "spec", "vm", "disks") or [])),
            cell(fmt_age(t.get("created_at"), state.now())),
        )
    emit(state.out, table)


@template_app.command("show")
def template_show(ctx: typer.Context, name: NameArg, output: OutputOpt = None) -> None:
    state = get_state(ctx)
    obj = state.client().get_object("templates", name)
    if state.wants_json(output):
        print_json(obj)
        return
    disks = ", ".join(str(d.get("volume")) for d in dig(obj, "spec", "vm", "disks") or [])
    rows = [
        ("Name", cell(obj.get("name"))),
        ("From VM", cell(dig(obj, "spec", "source_vm"))),
        ("vCPUs", cell(dig(obj, "spec", "vm", "vcpus"))),
        ("Memory", cell(f"{dig(obj, 'spec', 'vm', 'memory_mib')} MiB")),
        ("Image", cell(dig(obj, "spec", "vm", "image") or "-")),
        ("Disks", cell(disks)),
        ("NICs", cell(len(dig(obj, "spec", "vm", "nics") or []))),
    ]
    emit(state.out, kv_view(rows))


@template_app.command("delete")
def template_delete(
    ctx: typer.Context,
    name: NameArg,
    full_clones_first: Annotated[
        bool,
        typer.Option(
            "--full-clones-first", help="Copy the template's data into each linked clone first."
        ),
    ] = False,
    output: OutputOpt = None,
) -> None:
    """Delete a template (refused while linked clones depend on it)."""
    state = get_state(ctx)
    obj = state.client().delete_template(name, full_clones_first=full_clones_first)
    if state.wants_json(output):
        print_json(obj)
        return
    typer.echo(f"template {name} deleted")


def instantiate(
    ctx: typer.Context,
    template: str,
    name: str,
    *,
    start: bool,
    full: bool,
    labels: list[str] | None,
    wait: bool,
    timeout: float | None,
    output: Any,
    to: str | None = None,
    pool: str | None = None,
) -> None:
    """`corral vm create NAME --template T`: a VM from a template."""
    state = get_state(ctx)
    body: dict[str, Any] = {"name": name, "start": start, "full": full}
    if to is not None:
        body["to"] = to
    if pool is not None:
        body["pool"] = pool
    if labels:
        body["labels"] = parse_labels(labels)
    result = state.client().instantiate_template(template, body)
    finish_new_vm(state, result, name, wait, timeout, output)
