"""Copying a disk from one host to another: a read-only NBD export here, ``qemu-img convert``
there.

The source host exports a volume's data with ``qemu-nbd`` (read-only, bound to this host's
own address, on a free port, under a random export name); the target host reads it with
``qemu-img convert`` into a new qcow2 file (only allocated data travels: NBD reports holes).
When a running VM holds the file, the export reads a temporary internal snapshot (``-l``), so
the VM keeps running and the copy is of one instant; otherwise the file itself is exported
under a shared read lock, so no QEMU can start writing it meanwhile.

An export lives until ``stop`` (the server calls it once the target is done, whatever
happened) or until ``ttl_s`` passed, whichever is first; its temporary snapshot goes with it.
The export is plain NBD: anyone who can reach this host's address and learns the export name
could read the disk while it is exported (TLS comes with the cluster PKI).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.agent.drivers import Driver, QemuDriver
from corral.agent.drivers.qemu.snapshots import (
    HeldSnapshot,
    drop_temporary_snapshot,
    qemu_img,
    take_temporary_snapshot,
)
from corral.errors import DriverError, NotFound

__all__ = ["DiskExports", "NbdSource", "import_disk"]

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 30.0
_STOP_WAIT_S = 5.0


@dataclass(frozen=True)
class NbdSource:
    """Where a target host reads an exported disk."""

    host: str
    port: int
    export: str

    def image_opts(self) -> str:
        """``qemu-img --image-opts`` of the export's data (raw over NBD; no value holds a ',')."""
        return (
            "driver=raw,file.driver=nbd,file.server.type=inet,"
            f"file.server.host={self.host},file.server.port={self.port},file.export={self.export}"
        )


@dataclass
class _Export:
    id: str
    source: NbdSource
    path: Path
    pid: int
    vm: str | None
    held: HeldSnapshot | None
    expiry: asyncio.TimerHandle | None = None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


class DiskExports:
    """The NBD exports of this host (see the module docstring); ``bind`` is this host's own
    address."""

    def __init__(
        self, bind: str, run_dir: Path, *, qemu_nbd: str = "qemu-nbd", ttl_s: float = 3600.0
    ) -> None:
        self.bind = bind
        self.run_dir = run_dir
        self.qemu_nbd = qemu_nbd
        self.ttl_s = ttl_s
        self._exports: dict[str, _Export] = {}

    async def start(self, driver: Driver, vm: str | None, path: Path) -> dict[str, Any]:
        """Export ``path`` (a qcow2 file here; ``vm``: the VM that may hold it). The answer
        names the export (``id``, for ``stop``) and where to read it (host, port, export)."""
        if not await asyncio.to_thread(path.is_file):
            raise NotFound(f"{path} is not on this host")
        qemu = driver if isinstance(driver, QemuDriver) else None
        held = await take_temporary_snapshot(qemu, vm, path)
        try:
            export = await self._serve(path, held)
        except BaseException:
            if held is not None:
                await drop_temporary_snapshot(qemu, vm, path, held)
            raise
        export.vm = vm
        self._exports[export.id] = export
        loop = asyncio.get_running_loop()
        export.expiry = loop.call_later(
            self.ttl_s, lambda: asyncio.ensure_future(self.stop(driver, export.id))
        )
        log.info("exporting %s on %s:%d", path, export.source.host, export.source.port)
        return {
            "id": export.id,
            "host": export.source.host,
            "port": export.source.port,
            "export": export.source.export,
            "snapshot": held.tag if held else None,
        }

    async def _serve(self, path: Path, held: HeldSnapshot | None) -> _Export:
        await asyncio.to_thread(self.run_dir.mkdir, parents=True, exist_ok=True)
        export_id = secrets.token_hex(8)
        name = secrets.token_urlsafe(24)
        pidfile = self.run_dir / f"nbd-{export_id}.pid"
        opts = f"driver=qcow2,file.driver=file,file.filename={str(path).replace(',', ',,')}"
        extra: list[str] = []
        if held is not None:
            # The snapshot's clusters never change while it exists: read beside the QEMU.
            opts += ",file.locking=off"
            extra = ["-l", f"snapshot.name={held.tag}"]
        last = ""
        for _ in range(3):
            port = _free_port(self.bind)
            argv = [
                self.qemu_nbd,
                "--fork",
                f"--pid-file={pidfile}",
                "--persistent",
                "--read-only",
                f"--bind={self.bind}",
                f"--port={port}",
                f"--export-name={name}",
                *extra,
                "--image-opts",
                opts,
            ]
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                )
            except OSError as exc:
                raise DriverError(f"cannot run {self.qemu_nbd}: {exc}") from exc
            try:
                _, err = await asyncio.wait_for(proc.communicate(), _START_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise DriverError(f"qemu-nbd did not start within {_START_TIMEOUT_S:g} s") from None
            last = err.decode(errors="replace").strip()
            if proc.returncode == 0:
                pid = int((await asyncio.to_thread(pidfile.read_text)).strip())
                source = NbdSource(self.bind, port, name)
                return _Export(export_id, source, path, pid, None, held)
            if "Address already in use" not in last:
                break
        raise DriverError(f"qemu-nbd cannot export {path}: {last}")

    async def stop(self, driver: Driver | None, export_id: str) -> dict[str, Any]:
        """End an export and drop its temporary snapshot; idempotent."""
        export = self._exports.pop(export_id, None)
        if export is None:
            return {"id": export_id, "stopped": False}
        if export.expiry is not None:
            export.expiry.cancel()
        with contextlib.suppress(ProcessLookupError):
            os.kill(export.pid, signal.SIGTERM)
        for _ in range(int(_STOP_WAIT_S / 0.05)):
            if not _alive(export.pid):
                break
            await asyncio.sleep(0.05)
        if _alive(export.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(export.pid, signal.SIGKILL)
        (self.run_dir / f"nbd-{export_id}.pid").unlink(missing_ok=True)
        if export.held is not None:
            qemu = driver if isinstance(driver, QemuDriver) else None
            try:
                await drop_temporary_snapshot(qemu, export.vm, export.path, export.held)
            except DriverError as exc:
                log.warning("export %s: cannot drop snapshot %s: %s", export_id, export.held, exc)
        return {"id": export_id, "stopped": True}

    async def close(self, driver: Driver | None) -> None:
        """End every export (agent shutdown)."""
        for export_id in list(self._exports):
            await self.stop(driver, export_id)


async def import_disk(source: NbdSource, target: Path, size_gib: int | None) -> None:
    """Copy an exported disk into the new qcow2 file ``target`` (which must not exist); it
    appears under its name only once complete."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    try:
        await qemu_img(
            "convert", "-q", "--image-opts", source.image_opts(), "-O", "qcow2", str(tmp)
        )
        if size_gib:
            await qemu_img("resize", "-q", "-f", "qcow2", str(tmp), f"{size_gib}G")
        await asyncio.to_thread(os.replace, tmp, target)
    finally:
        await asyncio.to_thread(tmp.unlink, True)
