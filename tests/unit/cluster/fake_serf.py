"""A scripted stand-in for a serf agent's RPC listener, for client tests without serf.

It speaks the wire format the way the agent does: a header per answer, then a body only for
commands that have one. Tests replace entries of ``handlers`` to change how a command is
answered (late, out of order, with an error, or not at all).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]

# Commands whose request carries a body map after the header.
_WITH_ARGS = frozenset(
    {"handshake", "auth", "join", "members-filtered", "force-leave", "tags", "stream", "stop"}
)

MEMBER: dict[str, Any] = {
    "Name": "n1",
    "Addr": b"\x7f\x00\x00\x01",
    "Port": 7946,
    "Tags": {"role": "server"},
    "Status": "alive",
    "ProtocolMin": 1,
    "ProtocolMax": 5,
    "ProtocolCur": 2,
    "DelegateMin": 2,
    "DelegateMax": 5,
    "DelegateCur": 5,
}

Handler = Callable[["FakeConnection", int, Any], Coroutine[Any, Any, None]]


class FakeConnection:
    """One accepted client connection."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.streams: list[int] = []

    def send(self, *objs: object) -> None:
        self.writer.write(b"".join(msgpack.packb(o) for o in objs))

    def answer(self, seq: int, body: object = None, error: str = "") -> None:
        if body is None:
            self.send({"Seq": seq, "Error": error})
        else:
            self.send({"Seq": seq, "Error": error}, body)

    def event(self, record: dict[str, Any]) -> None:
        """Push one event record on every open stream."""
        for seq in self.streams:
            self.answer(seq, record)


async def _handshake(conn: FakeConnection, seq: int, body: Any) -> None:
    conn.answer(seq, error="" if body == {"Version": 1} else "Unsupported IPC version")


async def _members(conn: FakeConnection, seq: int, body: Any) -> None:
    conn.answer(seq, {"Members": [MEMBER]})


async def _stats(conn: FakeConnection, seq: int, body: Any) -> None:
    conn.answer(seq, {"agent": {"name": "n1"}, "serf": {"members": "1"}})


async def _stream(conn: FakeConnection, seq: int, body: Any) -> None:
    conn.streams.append(seq)
    conn.answer(seq)


async def _stop(conn: FakeConnection, seq: int, body: Any) -> None:
    conn.streams.remove(body["Stop"])
    conn.answer(seq)


async def _bare(conn: FakeConnection, seq: int, body: Any) -> None:
    conn.answer(seq)


class FakeSerf:
    """Listens on 127.0.0.1; records every request as ``(command, seq, body)``."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int, Any]] = []
        self.connections: list[FakeConnection] = []
        self.handlers: dict[str, Handler] = {
            "handshake": _handshake,
            "auth": _bare,
            "members": _members,
            "members-filtered": _members,
            "stats": _stats,
            "stream": _stream,
            "stop": _stop,
            "tags": _bare,
            "force-leave": _bare,
            "leave": _bare,
        }
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._arrived: dict[str, asyncio.Event] = {}

    def arrived(self, command: str) -> asyncio.Event:
        """Set once a request for ``command`` has been received."""
        return self._arrived.setdefault(command, asyncio.Event())

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def close(self) -> None:
        for conn in self.connections:
            conn.writer.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = FakeConnection(writer)
        self.connections.append(conn)
        unpacker = msgpack.Unpacker(raw=False)
        header: dict[str, Any] | None = None
        while data := await reader.read(65536):
            unpacker.feed(data)
            for obj in unpacker:
                if header is None and obj["Command"] in _WITH_ARGS:
                    header = obj
                    continue
                head, body = (header, obj) if header is not None else (obj, None)
                header = None
                self.requests.append((head["Command"], head["Seq"], body))
                self.arrived(head["Command"]).set()
                # Each request is handled in its own task, so a slow one does not hold others.
                task = asyncio.create_task(self.handlers[head["Command"]](conn, head["Seq"], body))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
