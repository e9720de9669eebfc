"""`corral pool|volume|image ...` and `corral vm disk attach|detach`: storage from the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from corral.cli.context import CliState, get_state
from corral.cli.params import LabelsOpt, OutputOpt, TimeoutOpt, WaitOpt, parse_labels, parse_memory
from corral.cli.render import (
    cell,
    dig,
    emit,
    fmt_age,
    fmt_labels,
    kv_view,
    new_table,
    print_json,
    state_cell,
)
from corral.cli.waiting import finish_action, vm_refresher
from corral.client import ApiObject, CorralError

__all__ = ["attach_disk_commands", "image_app", "parse_gib", "pool_app", "volume_app"]

pool_app = typer.Typer(name="pool", help="Storage pools: where disks live.", no_args_is_help=True)
volume_app = typer.Typer(
    name="volume", help="Volumes: virtual disks in a pool.", no_args_is_help=True
)
image_app = typer.Typer(
    name="image", help="Images: disks (and boot files) VMs start from.", no_args_is_help=True
)
disk_app = typer.Typer(name="disk", help="Attach volumes to VMs.", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(metavar="NAME", show_default=False)]
_CHUNK = 1024 * 1024


def parse_gib(value: str) -> int:
    """Whole GiB from `2`, `2G`, `2GiB`, `1T`, `2048M`; BadParameter otherwise."""
    text = value.strip()
    mib = parse_memory(text + "G" if text.isdigit() else text)
    if mib % 1024:
        raise typer.BadParameter(f"{value!r} is not a whole number of GiB (sizes are in GiB)")
    return mib // 1024


SizeOpt = Annotated[
    int | None,
    typer.Option(
        "--size",
        parser=parse_gib,
        metavar="SIZE",
        help="Size in GiB: 10, 10G, 1T.",
        show_default=False,
    ),
]


def _listing(state: CliState, kind: str, output: Any, **filters: str | None) -> list[ApiObject]:
    page = state.client().list_objects(kind, **filters)
    if state.wants_json(output):
        print_json(page)
        return []
    if not page["items"]:
        typer.echo(f"no {kind} found", err=True)
    return page["items"]


def _show(state: CliState, obj: ApiObject, output: Any, rows: list[tuple[str, Any]]) -> None:
    if state.wants_json(output):
        print_json(obj)
        return
    now = state.now()
    rows = [
        ("Name", cell(obj.get("name"))),
        ("ID", cell(obj.get("id"))),
        *rows,
        ("Created", cell(fmt_age(obj.get("created_at"), now))),
    ]
    emit(state.out, kv_view(rows))


# -- pools --------------------------------------------------------------------------------------


@pool_app.command("ls")
def pool_ls(ctx: typer.Context, output: OutputOpt = None) -> None:
    """List pools: NAME, DRIVER, PATH, SHARED."""
    state = get_state(ctx)
    items = _listing(state, "pools", output)
    if not items:
        return
    table = new_table("NAME", "DRIVER", "PATH", "SHARED", "AGE")
    for pool in items:
        table.add_row(
            cell(pool.get("name")),
            cell(dig(pool, "spec", "driver")),
            cell(dig(pool, "spec", "path") or "<data-dir>/pools/" + str(pool.get("name"))),
            cell("yes" if dig(pool, "spec", "shared") else "no"),
            cell(fmt_age(pool.get("created_at"), state.now())),
        )
    emit(state.out, table)


@pool_app.command("show")
def pool_show(ctx: typer.Context, name: NameArg, output: OutputOpt = None) -> None:
    """Show one pool."""
    state = get_state(ctx)
    client = state.client()
    pool = client.get_object("pools", name)
    rows: list[tuple[str, Any]] = [
        ("Driver", cell(dig(pool, "spec", "driver"))),
        ("Path", cell(dig(pool, "spec", "path") or f"<data-dir>/pools/{name} on each host")),
        ("Shared", cell("yes" if dig(pool, "spec", "shared") else "no")),
    ]
    for node in client.iter_nodes():
        usage = dig(node, "status", "inventory", "pools", name)
        if isinstance(usage, dict):
            gib = 1024**3
            rows.append(
                (
                    f"On {node.get('name')}",
                    cell(
                        f"{usage.get('volumes', 0)} volumes, "
                        f"{usage.get('allocated_bytes', 0) / gib:.2f} GiB written; filesystem "
                        f"{usage.get('free_bytes', 0) / gib:.1f} of "
                        f"{usage.get('total_bytes', 0) / gib:.1f} GiB free"
                    ),
                )
            )
    _show(state, pool, output, rows)


@pool_app.command("create")
def pool_create(
    ctx: typer.Context,
    name: NameArg,
    path: Annotated[
        str | None,
        typer.Option("--path", help="Directory on every host (default <data-dir>/pools/NAME)."),
    ] = None,
    shared: Annotated[
        bool, typer.Option("--shared", help="Every host sees the same files (NFS, ...).")
    ] = False,
    output: OutputOpt = None,
) -> None:
    """Create a `dir` pool."""
    state = get_state(ctx)
    body: dict[str, Any] = {"name": name, "shared": shared}
    if path:
        body["path"] = path
    pool = state.client().create_object("pools", body)
    if state.wants_json(output):
        print_json(pool)
        return
    typer.echo(f"pool {name} created")


@pool_app.command("delete")
def pool_delete(ctx: typer.Context, name: NameArg, output: OutputOpt = None) -> None:
    """Delete an empty pool (its volumes must be deleted first)."""
    state = get_state(ctx)
    pool = state.client().delete_object("pools", name)
    if state.wants_json(output):
        print_json(pool)
        return
    typer.echo(f"pool {name} deleted")


# -- volumes ------------------------------------------------------------------------------------


def _volume_row(volume: ApiObject) -> list[str]:
    return [
        str(volume.get("name")),
        str(dig(volume, "status", "state") or ""),
        str(dig(volume, "spec", "pool") or ""),
        f"{dig(volume, 'spec', 'size_gib')} GiB",
        str(dig(volume, "status", "node") or "-"),
        str(dig(volume, "status", "attached_to") or "-"),
        str(dig(volume, "spec", "image") or "-"),
    ]


@volume_app.command("ls")
def volume_ls(
    ctx: typer.Context,
    node: Annotated[str | None, typer.Option("--node", help="Only volumes on this host.")] = None,
    pool: Annotated[str | None, typer.Option("--pool", help="Only volumes in this pool.")] = None,
    output: OutputOpt = None,
) -> None:
    """List volumes: NAME, STATE, POOL, SIZE, NODE, VM, IMAGE."""
    state = get_state(ctx)
    items = _listing(state, "volumes", output, node=node, pool=pool)
    if not items:
        return
    table = new_table("NAME", "STATE", "POOL", "SIZE", "NODE", "VM", "IMAGE")
    for volume in items:
        row = _volume_row(volume)
        table.add_row(cell(row[0]), state_cell(row[1]), *(cell(x) for x in row[2:]))
    emit(state.out, table)


@volume_app.command("show")
def volume_show(ctx: typer.Context, name: NameArg, output: OutputOpt = None) -> None:
    """Show one volume: pool, size, host, file, VM, image."""
    state = get_state(ctx)
    volume = state.client().get_object("volumes", name)
    allocated = dig(volume, "status", "allocated_bytes")
    _show(
        state,
        volume,
        output,
        [
            ("State", state_cell(dig(volume, "status", "state"))),
            ("Message", cell(dig(volume, "status", "message"))),
            ("Pool", cell(dig(volume, "spec", "pool"))),
            ("Size", cell(f"{dig(volume, 'spec', 'size_gib')} GiB")),
            ("Allocated", cell(f"{allocated / 1048576:.1f} MiB" if allocated else None)),
            ("Node", cell(dig(volume, "status", "node"))),
            ("Path", cell(dig(volume, "status", "path"))),
            ("Attached to", cell(dig(volume, "status", "attached_to"))),
            ("Image", cell(dig(volume, "spec", "image"))),
            ("Clone", cell("full" if dig(volume, "spec", "full_clone") else "linked")),
            ("Labels", cell(fmt_labels(dig(volume, "spec", "labels")))),
        ],
    )


@volume_app.command("create")
def volume_create(
    ctx: typer.Context,
    name: NameArg,
    size: SizeOpt = None,
    pool: Annotated[str, typer.Option("--pool", help="The pool.")] = "local",
    image: Annotated[
        str | None, typer.Option("--image", help="Start as a copy of this image.")
    ] = None,
    full: Annotated[
        bool, typer.Option("--full", help="A full copy of the image, not a linked clone.")
    ] = False,
    node: Annotated[
        str | None,
        typer.Option("--node", help="Create it on this host now (else on first use)."),
    ] = None,
    label: LabelsOpt = None,
    output: OutputOpt = None,
) -> None:
    """Create a volume (qcow2, thin): blank with --size, or from --image."""
    state = get_state(ctx)
    body: dict[str, Any] = {"name": name, "pool": pool, "full_clone": full}
    if size is not None:
        body["size_gib"] = size
    if image:
        body["image"] = image
    if node:
        body["node"] = node
    labels = parse_labels(label)
    if labels:
        body["labels"] = labels
    volume = state.client().create_object("volumes", body)
    if state.wants_json(output):
        print_json(volume)
        return
    where = dig(volume, "status", "node")
    typer.echo(
        f"volume {name} created ({dig(volume, 'spec', 'size_gib')} GiB in pool {pool}"
        + (f" on {where}: {dig(volume, 'status', 'path')})" if where else ", made on first use)")
    )


@volume_app.command("resize")
def volume_resize(
    ctx: typer.Context,
    name: NameArg,
    size: Annotated[
        int, typer.Argument(parser=parse_gib, metavar="SIZE", help="New size (grow only): 20G.")
    ],
    output: OutputOpt = None,
) -> None:
    """Grow a volume (online when its VM runs)."""
    state = get_state(ctx)
    volume = state.client().patch_object("volumes", name, {"size_gib": size})
    if state.wants_json(output):
        print_json(volume)
        return
    typer.echo(f"volume {name} is now {dig(volume, 'spec', 'size_gib')} GiB")


@volume_app.command("delete")
def volume_delete(
    ctx: typer.Context,
    name: NameArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    output: OutputOpt = None,
) -> None:
    """Delete a volume and its file (refused while attached)."""
    state = get_state(ctx)
    if not yes:
        typer.confirm(f"delete volume {name} and its data?", abort=True, err=True)
    answer = state.client().delete_object("volumes", name, wait=wait, timeout=timeout)
    if state.wants_json(output):
        print_json(answer)
        return
    if answer.get("deleted"):
        typer.echo(f"volume {name} deleted")
    else:
        typer.echo(f"volume {name}: {dig(answer, 'status', 'message') or 'deleting'}")


# -- images -------------------------------------------------------------------------------------


def _read_chunks(path: Path, progress: Progress, label: str) -> Iterator[bytes]:
    size = path.stat().st_size
    task = progress.add_task(label, total=size)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            progress.advance(task, len(chunk))
            yield chunk


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _image_files(
    file: Path | None, kernel: Path | None, initrd: Path | None, cmdline: str | None
) -> tuple[dict[str, Path], str, str]:
    """(files to upload, boot, cmdline); a ``.json`` sidecar (guest/build.sh's tiny.json)
    names the disk and the boot files itself."""
    files: dict[str, Path] = {}
    boot = "disk"
    if file is not None and file.suffix == ".json":
        try:
            doc = json.loads(file.read_text())
            base = file.resolve().parent
            files["disk"] = base / str(doc["disk"])
            if doc.get("boot") == "direct-kernel":
                boot = "direct-kernel"
                files["kernel"] = base / str(doc["kernel"])
                if doc.get("initrd"):
                    files["initrd"] = base / str(doc["initrd"])
                cmdline = cmdline if cmdline is not None else str(doc.get("cmdline", ""))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise typer.BadParameter(
                f"{file}: not an image sidecar: {exc}", param_hint="--file"
            ) from None
    elif file is not None:
        files["disk"] = file
    if kernel is not None:
        boot = "direct-kernel"
        files["kernel"] = kernel
    if initrd is not None:
        files["initrd"] = initrd
    for what, path in files.items():
        if not path.is_file():
            raise typer.BadParameter(f"{path} is not a file", param_hint=f"the {what}")
    return files, boot, cmdline or ""


@image_app.command("import")
def image_import(
    ctx: typer.Context,
    name: NameArg,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="A raw/qcow2 disk to upload, or an image sidecar (.json) naming disk and boot "
            "files.",
        ),
    ] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="An https URL the server downloads the disk from.")
    ] = None,
    sha256: Annotated[
        str | None,
        typer.Option("--sha256", help="The disk's sha256 (required with --url, checked)."),
    ] = None,
    kernel: Annotated[
        Path | None, typer.Option("--kernel", help="Boot this kernel directly (direct-kernel).")
    ] = None,
    initrd: Annotated[Path | None, typer.Option("--initrd", help="...with this initrd.")] = None,
    cmdline: Annotated[str | None, typer.Option("--cmdline", help="Kernel command line.")] = None,
    output: OutputOpt = None,
) -> None:
    """Import an image: upload a local file (with progress) or have the server fetch a URL."""
    state = get_state(ctx)
    if (file is None) == (url is None):
        raise typer.BadParameter("give exactly one of --file and --url", param_hint="image import")
    if url is not None and not sha256:
        raise typer.BadParameter("--url needs --sha256 (the checksum is verified)")
    files, boot, cmd = _image_files(file, kernel, initrd, cmdline)
    body: dict[str, Any] = {"name": name, "boot": boot}
    if "initrd" in files:
        body["initrd"] = True
    if cmd:
        body["cmdline"] = cmd
    if url is not None:
        body["source"] = {"url": url, "sha256": sha256}
        files.pop("disk", None)
    client = state.client()
    image = client.create_object("images", body)
    show = not state.wants_json(output) and sys.stderr.isatty()
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        disable=not show,
        transient=True,
    ) as progress:
        try:
            for what in ("disk", "kernel", "initrd"):
                path = files.get(what)
                if path is None:
                    continue
                digest = _sha256(path)
                image = client.upload_image_file(
                    name, what, _read_chunks(path, progress, f"{what} {path.name}"), sha256=digest
                )
        except CorralError:
            # A refused or broken upload leaves nothing behind: the record goes too.
            with contextlib.suppress(CorralError):
                client.delete_object("images", name)
            raise
    if state.wants_json(output):
        print_json(image)
        return
    typer.echo(
        f"image {name} {dig(image, 'status', 'state')}"
        + (f": {dig(image, 'status', 'message')}" if dig(image, "status", "message") else "")
    )


@image_app.command("ls")
def image_ls(ctx: typer.Context, output: OutputOpt = None) -> None:
    """List images: NAME, STATE, FORMAT, SIZE, BOOT."""
    state = get_state(ctx)
    items = _listing(state, "images", output)
    if not items:
        return
    table = new_table("NAME", "STATE", "FORMAT", "SIZE", "BOOT", "AGE")
    for image in items:
        disk = dig(image, "status", "files", "disk") or {}
        size = disk.get("virtual_size_bytes") if isinstance(disk, dict) else None
        table.add_row(
            cell(image.get("name")),
            state_cell(dig(image, "status", "state")),
            cell(disk.get("format") if isinstance(disk, dict) else None),
            cell(f"{size / 1048576:.0f} MiB" if size else None),
            cell(dig(image, "spec", "boot")),
            cell(fmt_age(image.get("created_at"), state.now())),
        )
    emit(state.out, table)


@image_app.command("show")
def image_show(ctx: typer.Context, name: NameArg, output: OutputOpt = None) -> None:
    """Show one image: state, files (sha256, size, host), boot."""
    state = get_state(ctx)
    image = state.client().get_object("images", name)
    files = dig(image, "status", "files") or {}
    rows: list[tuple[str, Any]] = [
        ("State", state_cell(dig(image, "status", "state"))),
        ("Message", cell(dig(image, "status", "message"))),
        ("Boot", cell(dig(image, "spec", "boot"))),
        ("Cmdline", cell(dig(image, "spec", "cmdline"))),
    ]
    for what, info in sorted(files.items()) if isinstance(files, dict) else []:
        fmt = f" {info.get('format')}" if info.get("format") else ""
        rows.append(
            (
                what.capitalize(),
                cell(
                    f"{info.get('size_bytes')} bytes{fmt} on {info.get('node')} "
                    f"sha256 {str(info.get('sha256'))[:16]}…"
                ),
            )
        )
    _show(state, image, output, rows)


@image_app.command("delete")
def image_delete(ctx: typer.Context, name: NameArg, output: OutputOpt = None) -> None:
    """Delete an image (refused while VMs or linked clones use it)."""
    state = get_state(ctx)
    image = state.client().delete_object("images", name)
    if state.wants_json(output):
        print_json(image)
        return
    typer.echo(f"image {name} deleted")


# -- vm disk attach / detach --------------------------------------------------------------------


def _disk_finish(
    state: CliState, result: Any, vm: str, verb: str, wait: bool, timeout: float | None, output: Any
) -> None:
    def describe(obj: ApiObject | None, task: ApiObject | None) -> str:
        disks = [d.get("volume") for d in (dig(obj or {}, "spec", "disks") or [])]
        return f"vm {vm} disks: {', '.join(str(d) for d in disks) or 'none'}"

    finish_action(
        state,
        result,
        wait=wait,
        timeout=timeout,
        json_output=state.wants_json(output),
        refresh=vm_refresher(state, vm),
        success=describe,
        accepted=f"{verb} on vm {vm} accepted",
    )


@disk_app.command("attach")
def disk_attach(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(metavar="VM")],
    volume: Annotated[str, typer.Argument(metavar="VOLUME")],
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    output: OutputOpt = None,
) -> None:
    """Attach a volume to a VM (hot-plugged into a running guest)."""
    state = get_state(ctx)
    result = state.client().attach_disk(vm, volume)
    _disk_finish(state, result, vm, f"attach of {volume}", wait, timeout, output)


@disk_app.command("detach")
def disk_detach(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(metavar="VM")],
    volume: Annotated[str, typer.Argument(metavar="VOLUME")],
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    output: OutputOpt = None,
) -> None:
    """Detach a volume from a VM (the guest must release it); the volume is kept."""
    state = get_state(ctx)
    result = state.client().detach_disk(vm, volume)
    _disk_finish(state, result, vm, f"detach of {volume}", wait, timeout, output)


def attach_disk_commands(vm_app: typer.Typer) -> None:
    vm_app.add_typer(disk_app, name="disk")
