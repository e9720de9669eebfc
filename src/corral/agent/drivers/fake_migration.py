"""Live migration for the ``fake`` driver: the same protocol as QEMU's, over a real TCP socket.

The agent's migration workers (``corral.agent.migrations``) drive this exactly as they drive
``QemuMigrator``, so drains and rebalances of fake VMs go through the leader's migration loop
like real guests, and a test sees what a user would: the guest keeps running, with the same
``started_at`` (the same boot), on another host.

Target (``start_incoming``): the VM is already defined here (stopped); a TCP server listens on
the host's own address (the ``host`` it is given, port chosen by the kernel) and the report
says ``listening`` with ``tcp:<host>:<port>``. The first connection must send one line of JSON
``{"id": <migration id>, "size": <bytes>}`` then exactly ``size`` bytes: the VM's state (id,
spec, state, ``started_at``, generations, extra) as JSON. Only once it all arrived and matches
the defined VM does the VM run here, with the source's ``started_at``, and the target answers
``{"ok": true}`` (or ``{"ok": false, "error": ...}``). A connection that breaks before the
whole document arrived changes nothing here.

Source (``outgoing``): connects, sends the header and the document in chunks (each chunk a
progress report: bytes sent, bytes remaining; ``transfer_delay_s`` spreads the chunks over
that long, so a test can watch or cancel a migration), waits for the answer, then stops its own
copy (``migrated to <target>``) and reports ``completed`` with the measured pause
(``downtime_ms``: from the last chunk to the answer) and total time. The transfer runs as a
task of its own, like a QEMU migration goes on while no agent watches: a cancel before the
last chunk stops it (the guest keeps running here); after the last chunk it is too late, and
``cancel_outgoing`` waits for the answer and says ``completed``.

A marker per VM (``<state_dir>/migrations/<name>.json``: id, role, state) survives an agent
restart like QEMU's ``migration.json``. A transfer or a listener does not (they live in the
agent process): a restarted source reports the transfer failed, a restarted target reports its
listener gone, and the leader rolls the migration back (the source keeps the guest).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from corral.agent.drivers.fake import FakeDriver
from corral.errors import DriverError
from corral.model import VmSpec
from corral.model.migration import IncomingMigration, MigrationReport, OutgoingMigration

__all__ = ["FakeMarker", "FakeMigrator"]

log = logging.getLogger(__name__)

MARKER_DIR = "migrations"
_CHUNKS = 8
_ANSWER_TIMEOUT_S = 30.0
_MAX_DOC = 16 * 1024 * 1024


@dataclass(frozen=True)
class FakeMarker:
    id: str
    role: str
    state: str  # started | completed | cancelled | failed
    data: dict[str, Any]


@dataclass
class _Transfer:
    """One outgoing transfer: its progress, and whether a cancel can still stop it."""

    id: str
    task: asyncio.Task[MigrationReport] | None = None
    sent: int = 0
    total: int = 0
    committed: bool = False  # the last byte went out: too late to cancel


def _parse_uri(uri: str) -> tuple[str, int]:
    kind, _, rest = uri.partition(":")
    host, _, port = rest.rpartition(":")
    if kind != "tcp" or not host or not port.isdigit():
        raise DriverError(f"fake migration: cannot use uri {uri!r} (want tcp:<host>:<port>)")
    return host, int(port)


class FakeMigrator:
    """The ``Migrator`` of the fake driver (see the module docstring)."""

    def __init__(self, driver: FakeDriver, *, transfer_delay_s: float = 0.0) -> None:
        self.driver = driver
        # Mutable so a test can slow a migration down (to watch or cancel it).
        self.transfer_delay_s = transfer_delay_s
        self._dir = driver.state_dir / MARKER_DIR
        self._servers: dict[str, asyncio.Server] = {}
        self._transfers: dict[str, _Transfer] = {}
        # VMs that may have a marker file: those found at start and every one written since.
        # The agent asks for every VM's marker on every pass; a VM not listed has none, so
        # that costs no failed open() per VM (only this process writes markers).
        self._may_have: set[str] | None = None

    # -- marker -------------------------------------------------------------------------------

    def _marker_path(self, name: str) -> Path:
        return self._dir / f"{name}.json"

    def _candidates(self) -> set[str]:
        if self._may_have is None:
            try:
                self._may_have = {p.stem for p in self._dir.glob("*.json")}
            except OSError:
                self._may_have = set()
        return self._may_have

    def marker(self, name: str) -> FakeMarker | None:
        if name not in self._candidates():
            return None
        try:
            doc = json.loads(self._marker_path(name).read_text(encoding="utf-8"))
            return FakeMarker(str(doc["id"]), str(doc["role"]), str(doc["state"]), dict(doc))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_marker(self, name: str, **doc: Any) -> None:
        path = self._marker_path(name)
        self._candidates().add(name)
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            raise DriverError(f"fake migration: cannot write {path}: {exc}") from exc

    def clear_marker(self, name: str) -> None:
        with contextlib.suppress(OSError):
            self._marker_path(name).unlink(missing_ok=True)
            self._candidates().discard(name)
        server = self._servers.pop(name, None)
        if server is not None:
            server.close()

    def close(self) -> None:
        """Stop listening (an agent that stops; tests)."""
        for server in self._servers.values():
            server.close()
        self._servers.clear()

    # -- target -------------------------------------------------------------------------------

    async def start_incoming(self, name: str, inc: IncomingMigration, host: str) -> MigrationReport:
        """Listen for the VM's state on ``host`` (idempotent for the same migration)."""
        marker = self.marker(name)
        if marker is not None and marker.id == inc.id and name in self._servers:
            return await self.incoming_report(name, inc.id)
        vm = await self.driver.inspect(name)
        if vm is None:
            raise DriverError(f"fake migration: vm {name} is not defined on this host")
        if vm.state in ("running", "paused"):
            raise DriverError(f"vm {name} already runs on this host; it cannot receive the guest")
        old = self._servers.pop(name, None)
        if old is not None:
            old.close()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                answer = await self._receive(name, inc.id, reader)
            except (DriverError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
                detail = exc.detail if isinstance(exc, DriverError) else str(exc)
                answer = {"ok": False, "error": detail or type(exc).__name__}
            with contextlib.suppress(OSError):
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
                writer.close()

        server = await asyncio.start_server(serve, host, 0)
        port = server.sockets[0].getsockname()[1]
        self._servers[name] = server
        uri = f"tcp:{host}:{port}"
        self._write_marker(name, id=inc.id, role="target", state="started", uri=uri)
        log.info("vm %s: incoming fake migration %s listening on %s", name, inc.id[:8], uri)
        return MigrationReport(
            id=inc.id, role="target", status="listening", uri=uri, message=f"listening on {uri}"
        )

    async def _receive(
        self, name: str, migration_id: str, reader: asyncio.StreamReader
    ) -> dict[str, Any]:
        header = json.loads(await reader.readline())
        if header.get("id") != migration_id:
            raise DriverError(f"expected migration {migration_id}, got {header.get('id')!r}")
        size = int(header["size"])
        if not 0 < size <= _MAX_DOC:
            raise DriverError(f"bad document size {size}")
        doc = json.loads(await reader.readexactly(size))
        current = await self.driver.inspect(name)
        if current is None or current.vm_id != doc["vm_id"]:
            raise DriverError(f"vm {name} here is not the vm being sent ({doc.get('vm_id')})")
        started = doc.get("started_at")
        self.driver.receive(
            name,
            state="paused" if doc["state"] == "paused" else "running",
            started_at=datetime.fromisoformat(started) if started else None,
            spec=VmSpec.model_validate(doc["spec"]),
            extra={str(k): str(v) for k, v in dict(doc.get("extra", {})).items()},
        )
        self._write_marker(name, id=migration_id, role="target", state="completed")
        server = self._servers.pop(name, None)
        if server is not None:
            server.close()
        return {"ok": True}

    async def incoming_report(self, name: str, migration_id: str) -> MigrationReport:
        marker = self.marker(name)
        if marker is None or marker.id != migration_id:
            return MigrationReport(
                id=migration_id, role="target", status="preparing", message="not started yet"
            )
        base = MigrationReport(
            id=migration_id, role="target", status="listening", uri=marker.data.get("uri")
        )
        if marker.state == "completed":
            return base.model_copy(
                update={"status": "completed", "message": "the guest runs on this host"}
            )
        if name not in self._servers:
            return base.model_copy(
                update={"status": "failed", "message": "the listener is gone (agent restarted)"}
            )
        return base

    # -- source -------------------------------------------------------------------------------

    async def outgoing(
        self, name: str, out: OutgoingMigration, top_only: set[str]
    ) -> AsyncIterator[MigrationReport]:
        """Send the VM (or follow the transfer under way), yielding progress until it
        completed, failed or was cancelled."""

        def report(status: str, **fields: Any) -> MigrationReport:
            return MigrationReport(id=out.id, role="source", status=status, **fields)  # type: ignore[arg-type]

        marker = self.marker(name)
        if marker is not None and marker.id == out.id and marker.state == "completed":
            yield report("completed", **marker.data.get("stats", {}))
            return
        transfer = self._transfers.get(name)
        if transfer is None or transfer.id != out.id:
            if marker is not None and marker.id == out.id and marker.state == "started":
                yield report("failed", message="the transfer was interrupted (agent restarted)")
                return
            vm = await self.driver.inspect(name)
            if vm is None or vm.state not in ("running", "paused"):
                state = vm.state if vm else "not defined"
                yield report("failed", message=f"the vm is {state} on the source")
                return
            self._write_marker(name, id=out.id, role="source", state="started", target=out.target)
            transfer = _Transfer(out.id)
            transfer.task = asyncio.create_task(self._send(name, out, transfer))
            self._transfers[name] = transfer
        task = transfer.task
        assert task is not None
        while not task.done():
            yield report(
                "active",
                transferred_bytes=transfer.sent,
                remaining_bytes=transfer.total - transfer.sent,
                total_bytes=transfer.total,
            )
            await asyncio.wait({task}, timeout=0.2)
        self._transfers.pop(name, None)
        try:
            yield task.result()
        except asyncio.CancelledError:
            yield report("cancelled", message="migration cancelled; the guest runs on this host")

    async def _send(self, name: str, out: OutgoingMigration, t: _Transfer) -> MigrationReport:
        began = time.monotonic()
        vm = await self.driver.inspect(name)
        if vm is None:
            raise DriverError(f"vm {name} is not defined on the source")
        doc = json.dumps(
            {
                "vm_id": vm.vm_id,
                "state": vm.state,
                "started_at": vm.started_at.isoformat() if vm.started_at else None,
                "spec": vm.spec.model_dump(mode="json"),
                "extra": dict(vm.extra),
            }
        ).encode()
        t.total = len(doc)
        fields: dict[str, Any] = {"total_bytes": t.total}

        def failed(message: str) -> MigrationReport:
            self._write_marker(name, id=out.id, role="source", state="failed")
            return MigrationReport(
                id=out.id, role="source", status="failed", message=message, **fields
            )

        host, port = _parse_uri(out.uri)
        paused_at = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            return failed(f"cannot reach the target at {out.uri}: {exc}")
        try:
            writer.write(json.dumps({"id": out.id, "size": t.total}).encode() + b"\n")
            step = max(1, -(-t.total // _CHUNKS))
            for i in range(0, t.total, step):
                if self.transfer_delay_s > 0:
                    await asyncio.sleep(self.transfer_delay_s / _CHUNKS)
                chunk = doc[i : i + step]
                if i + step >= t.total:
                    t.committed = True  # from here on the target may run the guest
                    paused_at = time.monotonic()
                writer.write(chunk)
                await writer.drain()
                t.sent += len(chunk)
            line = await asyncio.wait_for(reader.readline(), _ANSWER_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            return failed(f"the transfer to {out.uri} broke: {exc or type(exc).__name__}")
        finally:
            with contextlib.suppress(OSError):
                writer.close()
        try:
            answer = json.loads(line)
        except ValueError:
            answer = {"ok": False, "error": "the target closed the connection"}
        if not answer.get("ok"):
            return failed(f"the target refused the guest: {answer.get('error')}")
        downtime = round((time.monotonic() - paused_at) * 1000)
        self.driver.migrated_away(name, out.target)
        fields.update(
            transferred_bytes=t.total,
            remaining_bytes=0,
            downtime_ms=downtime,
            total_time_ms=round((time.monotonic() - began) * 1000),
        )
        self._write_marker(name, id=out.id, role="source", state="completed", stats=fields)
        log.info("vm %s: fake migration %s to %s completed", name, out.id[:8], out.target)
        return MigrationReport(
            id=out.id,
            role="source",
            status="completed",
            message=f"the guest runs on {out.target}",
            **fields,
        )

    async def cancel_outgoing(self, name: str, migration_id: str) -> MigrationReport:
        """Stop the transfer if it can still be stopped; ``completed`` when it is too late."""
        transfer = self._transfers.get(name)
        if transfer is not None and transfer.id == migration_id and transfer.task is not None:
            if not transfer.committed:
                transfer.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await transfer.task
        marker = self.marker(name)
        if marker is not None and marker.id == migration_id and marker.state == "completed":
            stats = marker.data.get("stats", {})
            return MigrationReport(id=migration_id, role="source", status="completed", **stats)
        self._transfers.pop(name, None)
        self.clear_marker(name)
        return MigrationReport(
            id=migration_id,
            role="source",
            status="cancelled",
            message="migration cancelled; the guest runs on this host",
        )
