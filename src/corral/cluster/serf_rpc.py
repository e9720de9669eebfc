"""An asyncio client of the Serf agent's msgpack RPC ("IPC", protocol version 1).

Wire format (from the Serf agent's ``ipc.go``): a TCP stream of back-to-back msgpack objects with
no length prefix. Every request is a header ``{"Command": str, "Seq": int}``, followed by a body
map for commands that take arguments. Every response is a header ``{"Seq": int, "Error": str}``;
whether a body map follows depends on the *command*, not on the header, so the reader must
remember what each outstanding sequence number was for (:class:`ResponseFramer`). An event
stream answers once with a bare header (the acknowledgement) and then sends header + record for
every event, all under the sequence number of its ``stream`` request, interleaved with the
answers to other requests on the same connection.

Every failure at this boundary (refused or lost connection, timeout, an ``Error`` from serf, a
malformed frame) is raised as :class:`SerfError`. The agent drops the connection without an
answer when a request is malformed (unknown command, an invalid ``members-filtered`` regex);
that surfaces as a lost connection, and a client is unusable after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, cast

import msgpack  # type: ignore[import-untyped, unused-ignore]

from corral.errors import CorralError

__all__ = [
    "DEFAULT_MEMBER_EVENTS",
    "EventStream",
    "Frame",
    "Member",
    "MemberEvent",
    "QueryEvent",
    "ResponseFramer",
    "SerfClient",
    "SerfError",
    "SerfEvent",
    "UserEvent",
    "decode_event",
    "decode_member",
    "encode_request",
    "is_response_header",
]

log = logging.getLogger(__name__)

IPC_VERSION: Final = 1
DEFAULT_MEMBER_EVENTS: Final = "member-join,member-leave,member-failed,member-update,member-reap"

# The agent answers these before looking at the command, so no body follows them.
_NO_BODY_ERRORS: Final = frozenset({"Handshake required", "Authentication required"})


class SerfError(CorralError):
    """The gossip layer failed: serf refused a request, or its RPC could not be reached."""

    type_slug = "gossip"
    title = "Gossip layer error"
    status = 503


# --- typed results -------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One cluster member as this agent sees it.

    ``status`` is serf's word for it: ``alive``, ``leaving``, ``left``, ``failed`` (or ``none``
    for a member it has not heard from yet). ``protocol_*`` are memberlist protocol versions,
    ``delegate_*`` serf protocol versions.
    """

    name: str
    addr: str
    port: int
    tags: Mapping[str, str] = field(hash=False)
    status: str
    protocol_min: int
    protocol_max: int
    protocol_cur: int
    delegate_min: int
    delegate_max: int
    delegate_cur: int

    @property
    def gossip_addr(self) -> str:
        """``host:port`` as ``join`` accepts it (IPv6 hosts in brackets)."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"{host}:{self.port}"


MemberEventKind = Literal[
    "member-join", "member-leave", "member-failed", "member-update", "member-reap"
]
_MEMBER_EVENT_KINDS: Final = frozenset(
    {"member-join", "member-leave", "member-failed", "member-update", "member-reap"}
)


@dataclass(frozen=True)
class MemberEvent:
    """Members that joined, left, failed, changed tags, or were reaped, in one batch."""

    kind: MemberEventKind
    members: tuple[Member, ...]


@dataclass(frozen=True)
class UserEvent:
    """A custom event fired with ``serf event``; ``ltime`` is its Lamport time."""

    ltime: int
    name: str
    payload: bytes
    coalesce: bool


@dataclass(frozen=True)
class QueryEvent:
    """A query addressed to this agent; ``id`` is what a response would quote."""

    id: int
    ltime: int
    name: str
    payload: bytes


SerfEvent = MemberEvent | UserEvent | QueryEvent


# --- pure helpers: encoding, framing, decoding ---------------------------------------------


def encode_request(command: str, seq: int, body: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of one request: its header, then its body when the command takes one."""
    data = cast(bytes, msgpack.packb({"Command": command, "Seq": seq}))
    if body is not None:
        data += cast(bytes, msgpack.packb(dict(body)))
    return data


def is_response_header(obj: object) -> bool:
    """True for ``{"Seq": int, "Error": str}``, which no response body ever looks like."""
    return (
        isinstance(obj, dict)
        and obj.keys() == {"Seq", "Error"}
        and isinstance(obj["Seq"], int)
        and isinstance(obj["Error"], str)
    )


@dataclass(frozen=True)
class Frame:
    """One response: its header's ``seq`` and ``error``, and the body (None when it has none)."""

    seq: int
    error: str
    body: Any = None


_ONE_BARE: Final = "bare"  # one header, no body
_ONE_BODY: Final = "body"  # one header, then one body
_STREAM_ACK: Final = "ack"  # a stream before its acknowledgement
_STREAM: Final = "stream"  # an acknowledged stream: header + record per event


class ResponseFramer:
    """Sans-IO reader that cuts the agent's byte stream into :class:`Frame` s.

    Call :meth:`expect` / :meth:`expect_stream` for a sequence number *before* its request is
    written, so the answer can never arrive unannounced. A header for a sequence number nobody
    expects (a stream already stopped, an abandoned call) is delivered as a frame all the same,
    and a non-header object right after it or after a bare answer is dropped: newer agents add
    bodies (``force-leave`` answers ``{"Exists": bool}``) that older ones do not send.

    :meth:`feed` raises :class:`SerfError` when the stream cannot be framed any more.
    """

    def __init__(self) -> None:
        self._unpacker = msgpack.Unpacker(raw=False, unicode_errors="replace")
        self._expected: dict[int, str] = {}
        self._body_of: dict[str, Any] | None = None
        self._lenient = False
        self.dropped = 0

    def expect(self, seq: int, *, body: bool) -> None:
        """Announce a one-shot request; ``body`` says whether its answer carries one."""
        self._expected[seq] = _ONE_BODY if body else _ONE_BARE

    def expect_stream(self, seq: int) -> None:
        """Announce a ``stream`` request: a bare acknowledgement, then a record per header for
        as long as the connection lives (records may trail a ``stop``)."""
        self._expected[seq] = _STREAM_ACK

    def feed(self, data: bytes) -> list[Frame]:
        """Take bytes off the socket; return every frame they complete, in order."""
        self._unpacker.feed(data)
        frames: list[Frame] = []
        try:
            for obj in self._unpacker:
                frame = self._take(obj)
                if frame is not None:
                    frames.append(frame)
        except (ValueError, msgpack.UnpackException) as exc:
            raise SerfError(f"serf RPC sent undecodable data: {exc}") from exc
        return frames

    def _take(self, obj: Any) -> Frame | None:
        if self._body_of is not None:
            header, self._body_of = self._body_of, None
            return Frame(header["Seq"], header["Error"], obj)
        if not is_response_header(obj):
            if self._lenient:
                self._lenient = False
                self.dropped += 1
                return None
            raise SerfError(f"serf RPC sent {type(obj).__name__} where a response header belongs")
        seq: int = obj["Seq"]
        error: str = obj["Error"]
        kind = self._expected.get(seq)
        self._lenient = False
        if kind == _ONE_BODY:
            del self._expected[seq]
            if error in _NO_BODY_ERRORS:
                return Frame(seq, error)
            self._body_of = obj
            return None
        if kind == _STREAM:
            self._body_of = obj
            return None
        if kind == _ONE_BARE:
            del self._expected[seq]
        elif kind == _STREAM_ACK:
            if error:
                del self._expected[seq]
            else:
                self._expected[seq] = _STREAM
        self._lenient = True
        return Frame(seq, error)


def _field(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise SerfError(f"malformed {what} from serf: {key} is {value!r}")
    return value


def _decode_addr(value: object) -> str:
    if isinstance(value, bytes) and len(value) in (4, 16):
        ip = ipaddress.ip_address(value)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ip)
    raise SerfError(f"malformed member from serf: Addr is {value!r}")


def decode_member(raw: object) -> Member:
    """A :class:`Member` from one record of a ``members`` answer or a member event.

    Addresses arrive as 4 or 16 raw bytes; IPv4-mapped IPv6 comes back as plain IPv4. A nil
    tag map means no tags. Raises :class:`SerfError` naming the field that is wrong.
    """
    if not isinstance(raw, dict):
        raise SerfError(f"malformed member from serf: {raw!r}")
    tags = raw.get("Tags") or {}
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise SerfError(f"malformed member from serf: Tags is {tags!r}")
    versions = [
        _field(raw, key, int, "member")
        for key in (
            "ProtocolMin",
            "ProtocolMax",
            "ProtocolCur",
            "DelegateMin",
            "DelegateMax",
            "DelegateCur",
        )
    ]
    return Member(
        name=_field(raw, "Name", str, "member"),
        addr=_decode_addr(raw.get("Addr")),
        port=_field(raw, "Port", int, "member"),
        tags=MappingProxyType(dict(tags)),
        status=_field(raw, "Status", str, "member"),
        protocol_min=versions[0],
        protocol_max=versions[1],
        protocol_cur=versions[2],
        delegate_min=versions[3],
        delegate_max=versions[4],
        delegate_cur=versions[5],
    )


def decode_event(raw: object) -> SerfEvent:
    """The typed event for one stream record; raises :class:`SerfError` if it is malformed."""
    if not isinstance(raw, dict):
        raise SerfError(f"malformed event from serf: {raw!r}")
    kind = raw.get("Event")
    if kind in _MEMBER_EVENT_KINDS:
        members = raw.get("Members") or []
        if not isinstance(members, list):
            raise SerfError(f"malformed event from serf: Members is {members!r}")
        return MemberEvent(
            kind=cast(MemberEventKind, kind), members=tuple(decode_member(m) for m in members)
        )
    payload = raw.get("Payload") or b""
    if not isinstance(payload, bytes):
        raise SerfError(f"malformed event from serf: Payload is {payload!r}")
    if kind == "user":
        return UserEvent(
            ltime=_field(raw, "LTime", int, "event"),
            name=_field(raw, "Name", str, "event"),
            payload=payload,
            coalesce=bool(raw.get("Coalesce")),
        )
    if kind == "query":
        return QueryEvent(
            id=_field(raw, "ID", int, "event"),
            ltime=_field(raw, "LTime", int, "event"),
            name=_field(raw, "Name", str, "event"),
            payload=payload,
        )
    raise SerfError(f"unknown event type from serf: {kind!r}")


def _check_filter_regex(what: str, pattern: str) -> None:
    # The agent drops the whole connection on a regex it cannot compile; catch the obvious ones.
    try:
        re.compile(pattern)
    except re.error as exc:
        raise SerfError(f"{what}: not a valid regular expression ({exc})") from exc


# --- the client -----------------------------------------------------------------------------


_END: Final = object()


class EventStream:
    """One ``stream`` subscription; an async iterator of :class:`SerfEvent`.

    Use as ``async with client.stream(...) as events: async for ev in events: ...``. Entering
    subscribes and returns once serf has acknowledged, so no event after that moment is missed.
    Iteration ends cleanly after :meth:`close` or :meth:`SerfClient.close`; it raises
    :class:`SerfError` when the connection is lost, serf sends a malformed record, or more than
    ``max_pending`` events pile up unread (then re-read the member list and subscribe again).
    """

    def __init__(self, client: SerfClient, filter: str, max_pending: int) -> None:
        self.filter = filter
        self.max_pending = max_pending
        self._client = client
        self._seq: int | None = None
        self._items: deque[SerfEvent] = deque()
        self._end: object | SerfError | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        """Subscribe; raises :class:`SerfError` if serf refuses the filter or cannot be reached."""
        if self._seq is not None:
            raise SerfError("event stream already started")
        self._seq = await self._client._subscribe(self)

    async def close(self) -> None:
        """Unsubscribe (if the connection still stands) and end the iteration. Idempotent."""
        self._finish(_END)
        if self._seq is not None:
            seq, self._seq = self._seq, None
            await self._client._unsubscribe(seq)

    async def __aenter__(self) -> EventStream:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[SerfEvent]:
        return self

    async def __anext__(self) -> SerfEvent:
        while not self._items and self._end is None:
            self._wake.clear()
            await self._wake.wait()
        if self._items:
            return self._items.popleft()
        if isinstance(self._end, SerfError):
            raise SerfError(self._end.detail)
        raise StopAsyncIteration

    def _deliver(self, raw: object) -> None:
        if self._end is not None:
            return
        try:
            event = decode_event(raw)
        except SerfError as exc:
            self._finish(exc)
            return
        if len(self._items) >= self.max_pending:
            self._finish(SerfError(f"event stream fell behind: {self.max_pending} events unread"))
            return
        self._items.append(event)
        self._wake.set()

    def _finish(self, end: object | SerfError) -> None:
        if self._end is None:
            self._end = end
        self._wake.set()


class SerfClient:
    """One RPC connection to a local serf agent. Safe for many concurrent calls and streams.

    Build with :meth:`connect` (it performs the handshake, and ``auth`` when a token is given);
    close with :meth:`close` or ``async with``. Every method raises :class:`SerfError` on any
    failure; after a lost connection every call raises it at once.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, timeout_s: float
    ) -> None:
        """Wrap an open connection; prefer :meth:`connect`, which also handshakes."""
        self.timeout_s = timeout_s
        self._reader = reader
        self._writer = writer
        self._framer = ResponseFramer()
        self._seq = 0
        self._calls: dict[int, asyncio.Future[Frame]] = {}
        self._streams: dict[int, EventStream] = {}
        self._acks: dict[int, asyncio.Future[Frame]] = {}
        self._write_lock = asyncio.Lock()
        self._broken: SerfError | None = None
        self._closed = False
        self._read_task = asyncio.create_task(self._read_loop(), name="serf-rpc-reader")

    @classmethod
    async def connect(
        cls, address: str, *, auth_key: str | None = None, timeout_s: float = 10.0
    ) -> SerfClient:
        """Connect to ``host:port`` (the agent's ``-rpc-addr``), handshake (IPC version 1) and
        authenticate when ``auth_key`` is given; ``timeout_s`` then bounds every call."""
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise SerfError(f"serf RPC address {address!r}: must be host:port")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise SerfError(f"cannot reach serf RPC at {address}: {exc}") from exc
        client = cls(reader, writer, timeout_s=timeout_s)
        try:
            await client._call("handshake", {"Version": IPC_VERSION})
            if auth_key is not None:
                await client._call("auth", {"AuthKey": auth_key})
        except BaseException:
            await client.close()
            raise
        return client

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or the connection was lost."""
        return self._closed or self._broken is not None

    async def __aenter__(self) -> SerfClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; open streams end cleanly, pending calls raise. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._read_task
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        self._fail_all(SerfError("serf RPC client closed"), streams_end=_END)

    # --- commands ---------------------------------------------------------------------------

    async def members(self) -> list[Member]:
        """Every member this agent knows, in any status (including itself)."""
        frame = await self._call("members", None, has_body=True)
        return _members_of(frame)

    async def members_filtered(
        self,
        *,
        tags: Mapping[str, str] | None = None,
        status: str | None = None,
        name: str | None = None,
    ) -> list[Member]:
        """Members matching every filter given. Each value is an RE2 regular expression that
        serf anchors (``^...$``): ``status="alive|leaving"``, ``tags={"role": "server"}``. A
        member lacking a filtered tag matches as if the tag were empty."""
        for key, pattern in (tags or {}).items():
            _check_filter_regex(f"tags[{key}]", pattern)
        _check_filter_regex("status", status or "")
        _check_filter_regex("name", name or "")
        body = {"Tags": dict(tags or {}), "Status": status or "", "Name": name or ""}
        frame = await self._call("members-filtered", body, has_body=True)
        return _members_of(frame)

    async def join(
        self, addrs: Iterable[str], replay: bool = False, *, timeout_s: float = 30.0
    ) -> int:
        """Join the cluster through any of ``addrs`` (``host`` or ``host:port``); return how
        many were contacted. Raises :class:`SerfError` when none could be (wrong gossip key,
        nothing listening). ``replay`` replays old user events. Each unreachable address can
        take serf up to its TCP timeout (10 s), hence the longer default ``timeout_s``."""
        body = {"Existing": list(addrs), "Replay": replay}
        frame = await self._call("join", body, has_body=True, timeout_s=timeout_s)
        if not isinstance(frame.body, dict) or not isinstance(frame.body.get("Num"), int):
            raise SerfError(f"malformed join answer from serf: {frame.body!r}")
        return cast(int, frame.body["Num"])

    async def leave(self, *, timeout_s: float = 30.0) -> None:
        """Leave the cluster gracefully; the agent then shuts down and drops this connection,
        so every open stream ends with :class:`SerfError` soon after."""
        await self._call("leave", None, timeout_s=timeout_s)

    async def force_leave(self, node: str) -> None:
        """Mark a *failed* member as left at once instead of waiting for it to be reaped."""
        await self._call("force-leave", {"Node": node})

    async def tags(self, set: Mapping[str, str] | None = None, delete: Iterable[str] = ()) -> None:
        """Set and delete this agent's tags (``set`` wins over ``delete``); gossip spreads them
        to the others as a ``member-update``. Serf rejects tags over 512 encoded bytes."""
        body = {"Tags": dict(set or {}), "DeleteTags": list(delete)}
        await self._call("tags", body)

    async def stats(self) -> dict[str, dict[str, str]]:
        """The agent's statistics: sections ``agent``, ``runtime``, ``serf``, ``tags`` (and
        ``event_handlers``), each a map of strings."""
        frame = await self._call("stats", None, has_body=True)
        if not isinstance(frame.body, dict) or not all(
            isinstance(v, dict) for v in frame.body.values()
        ):
            raise SerfError(f"malformed stats answer from serf: {frame.body!r}")
        return {
            str(section): {str(k): str(v) for k, v in values.items()}
            for section, values in frame.body.items()
        }

    def stream(
        self, filter: str = DEFAULT_MEMBER_EVENTS, *, max_pending: int = 1024
    ) -> EventStream:
        """A not yet started subscription to events matching serf's ``filter`` syntax
        (``member-join,user:deploy,query,*``); see :class:`EventStream`."""
        return EventStream(self, filter, max_pending)

    # --- machinery --------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._check_usable()
        seq = self._seq
        self._seq += 1
        return seq

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise SerfError(self._broken.detail)
        if self._closed:
            raise SerfError("serf RPC client closed")

    async def _send(self, command: str, seq: int, body: Mapping[str, Any] | None) -> None:
        data = encode_request(command, seq, body)
        try:
            async with self._write_lock:
                self._check_usable()
                self._writer.write(data)
                await asyncio.wait_for(self._writer.drain(), self.timeout_s)
        except (OSError, TimeoutError) as exc:
            self._break(SerfError(f"serf RPC connection lost while sending {command}: {exc}"))
            raise SerfError(f"serf RPC connection lost while sending {command}: {exc}") from exc

    async def _call(
        self,
        command: str,
        args: Mapping[str, Any] | None,
        *,
        has_body: bool = False,
        timeout_s: float | None = None,
    ) -> Frame:
        """Send one request and wait for its answer; an ``Error`` in it raises."""
        seq = self._next_seq()
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        # Registered before sending, and left registered if we stop waiting: the answer still
        # arrives and must be framed (and dropped) to keep the stream aligned.
        self._framer.expect(seq, body=has_body)
        self._calls[seq] = future
        await self._send(command, seq, args)
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            frame = await asyncio.wait_for(future, limit)
        except TimeoutError as exc:
            raise SerfError(f"serf did not answer {command} within {limit:.0f}s") from exc
        if frame.error:
            raise SerfError(f"serf {command} failed: {_one_line(frame.error)}")
        return frame

    async def _subscribe(self, stream: EventStream) -> int:
        seq = self._next_seq()
        ack: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._framer.expect_stream(seq)
        self._acks[seq] = ack
        self._streams[seq] = stream
        try:
            await self._send("stream", seq, {"Type": stream.filter})
            frame = await asyncio.wait_for(ack, self.timeout_s)
        except TimeoutError as exc:
            await self._unsubscribe(seq)  # serf may still start it later
            raise SerfError(
                f"serf did not acknowledge stream within {self.timeout_s:.0f}s"
            ) from exc
        except BaseException:
            self._streams.pop(seq, None)
            raise
        if frame.error:
            self._streams.pop(seq, None)
            raise SerfError(f"serf refused stream {stream.filter!r}: {_one_line(frame.error)}")
        return seq

    async def _unsubscribe(self, seq: int) -> None:
        # Records already in flight for seq are still framed (the framer keeps expecting them).
        if self._streams.pop(seq, None) is None or self.closed:
            return
        with contextlib.suppress(SerfError):
            await self._call("stop", {"Stop": seq})

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    raise SerfError("serf RPC connection closed by the agent")
                for frame in self._framer.feed(data):
                    self._dispatch(frame)
        except SerfError as exc:
            self._break(exc)
        except OSError as exc:
            self._break(SerfError(f"serf RPC connection lost: {exc}"))
        except Exception as exc:  # a bug here must not leave callers waiting for their timeout
            log.exception("serf RPC reader failed")
            self._break(SerfError(f"serf RPC reader failed: {exc!r}"))

    def _dispatch(self, frame: Frame) -> None:
        call = self._calls.pop(frame.seq, None)
        if call is not None:
            if not call.done():
                call.set_result(frame)
            return
        ack = self._acks.pop(frame.seq, None)
        if ack is not None:
            if not ack.done():
                ack.set_result(frame)
            return
        stream = self._streams.get(frame.seq)
        if stream is not None:
            stream._deliver(frame.body)

    def _break(self, error: SerfError) -> None:
        if self._broken is None and not self._closed:
            log.info("%s", error.detail)
            self._broken = error
            self._writer.close()
        self._fail_all(error, streams_end=error)

    def _fail_all(self, error: SerfError, *, streams_end: object | SerfError) -> None:
        for future in (*self._calls.values(), *self._acks.values()):
            if not future.done():
                future.set_exception(SerfError(error.detail))
        self._calls.clear()
        self._acks.clear()
        for stream in self._streams.values():
            stream._finish(streams_end)
        self._streams.clear()


def _members_of(frame: Frame) -> list[Member]:
    members = frame.body.get("Members") if isinstance(frame.body, dict) else None
    if not isinstance(members, list):
        raise SerfError(f"malformed members answer from serf: {frame.body!r}")
    return [decode_member(m) for m in members]


def _one_line(error: str) -> str:
    # Serf's multi-errors span lines ("1 error occurred:\n\t* ..."); logs want one line.
    return " ".join(error.split())
