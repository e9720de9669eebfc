"""The state store: the only module that talks to etcd (through aetcd).

Contract:
- ``get`` / ``list`` read linearizably unless ``serializable=True``.
- ``commit(ops, expect)`` is one etcd transaction: all ops apply or none; when an expectation
  fails it raises ``Conflict`` and nothing is written.
- ``watch(prefix, from_revision)`` yields events after that revision; it raises ``Compacted``
  when the revision is gone, so callers re-list and watch again.
- Every etcd or network failure surfaces as ``corral.errors.Unavailable``.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.rpc as rpc
import grpc
from aetcd import watcher as aetcd_watcher
from aetcd.utils import prefix_range_end

from corral.errors import Conflict, CorralError, Malformed, Unavailable
from corral.state.batch import CommitBatcher, ReadBatcher

__all__ = [
    "KV",
    "Compacted",
    "Delete",
    "EtcdTls",
    "Expect",
    "Member",
    "Page",
    "Put",
    "Store",
    "StoreStatus",
    "WatchEvent",
    "make_cursor",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# What one gRPC message from etcd may carry. gRPC's default, 4 MiB, is less than a watch that
# catches up (etcd sends up to 1,000 revisions per message) or one revision of a large
# transaction can need; etcd's own Go client accepts up to 2 GiB, and so do we.
_CHANNEL_OPTIONS = {"grpc.max_receive_message_length": 2**31 - 1}
# Keys per read when listing a whole prefix: pages keep each message and etcd's work per
# request bounded however large the cluster grows (all pages are read at one revision).
LIST_PAGE_KEYS = 1000


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


@dataclass(frozen=True)
class Expect:
    """One compare of a transaction. Exactly one of the revision fields is set.

    ``Expect(key, mod_revision=0)`` means "the key does not exist".
    ``Expect(key, create_revision=N)`` fences on a leadership key created at revision N.
    """

    key: str
    mod_revision: int | None = None
    create_revision: int | None = None

    @classmethod
    def missing(cls, key: str) -> Expect:
        return cls(key, create_revision=0)

    @classmethod
    def unchanged(cls, kv: KV) -> Expect:
        return cls(kv.key, mod_revision=kv.mod_revision)


@dataclass(frozen=True)
class Page:
    items: list[KV]
    next_cursor: str | None
    revision: int


@dataclass(frozen=True)
class WatchEvent:
    type: str  # "put" | "delete"
    kv: KV


@dataclass(frozen=True)
class Member:
    id: int
    name: str
    peer_urls: list[str]
    client_urls: list[str]
    is_learner: bool


@dataclass(frozen=True)
class StoreStatus:
    version: str
    leader_id: int
    member_id: int
    raft_term: int
    raft_index: int
    db_size: int
    revision: int


@dataclass(frozen=True)
class EtcdTls:
    """What a client needs to talk TLS to etcd: the CA to trust and its own certificate (PEM).

    etcd runs with client certificate authentication, so a client without a certificate of
    the etcd CA is turned away at the handshake."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )


class _TlsClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client over a TLS channel (aetcd itself only opens plaintext channels).

    It opens the channel the way ``aetcd.Client.connect`` does, with TLS credentials instead:
    the stubs and the watcher are aetcd's own."""

    def __init__(self, *args: Any, credentials: grpc.ChannelCredentials, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        target = f"{self._host}:{self._port}"
        self.channel = rpc.secure_channel(
            target, self._credentials, options=list(self._options.items())
        )
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd_watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


class Compacted(CorralError):
    """The revision asked for has been compacted away; re-list and watch again."""

    def __init__(self, compacted_revision: int) -> None:
        super().__init__(
            f"revision compacted below {compacted_revision}"
            if compacted_revision
            else "revision compacted"
        )
        self.compacted_revision = compacted_revision


def _kv(raw: Any) -> KV:
    return KV(
        key=raw.key.decode(),
        value=bytes(raw.value),
        create_revision=raw.create_revision,
        mod_revision=raw.mod_revision,
        version=raw.version,
        lease=raw.lease,
    )


def make_cursor(revision: int, last_key: str) -> str:
    raw = json.dumps({"r": revision, "k": last_key}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        return int(data["r"]), str(data["k"])
    except (ValueError, KeyError, TypeError) as exc:
        raise Malformed("cursor: not a cursor this server handed out") from exc


class Store:
    """An etcd client over one or more endpoints (``http://host:port``), failing over in turn.

    With ``tls`` every connection is TLS with that client certificate (endpoints ``https://``).
    """

    def __init__(
        self, endpoints: Sequence[str], *, timeout_s: int = 5, tls: EtcdTls | None = None
    ) -> None:
        if not endpoints:
            raise ValueError("the store needs at least one etcd endpoint")
        self._endpoints = list(endpoints)
        self._timeout_s = timeout_s
        self._tls = tls
        self._index = 0
        self._client: aetcd.Client | None = None
        self._lock = asyncio.Lock()
        # Clients replaced by prefer(), closed once the calls in flight on them had time to end.
        self._retiring: dict[asyncio.Task[None], aetcd.Client] = {}
        self._batcher = CommitBatcher(self._txn)  # type: ignore[arg-type]
        self._reads = ReadBatcher(self._read_many)  # type: ignore[arg-type]

    @property
    def endpoint(self) -> str:
        return self._endpoints[self._index]

    def _make_client(self, endpoint: str | None = None) -> aetcd.Client:
        endpoint = endpoint or self.endpoint
        parts = urlsplit(endpoint if "//" in endpoint else "http://" + endpoint)
        host, port = parts.hostname or "127.0.0.1", parts.port or 2379
        if self._tls is not None:
            return _TlsClient(
                host=host,
                port=port,
                timeout=self._timeout_s,
                credentials=self._tls.credentials(),
                options=_CHANNEL_OPTIONS,
            )
        return aetcd.Client(host=host, port=port, timeout=self._timeout_s, options=_CHANNEL_OPTIONS)

    async def _connected(self) -> aetcd.Client:
        async with self._lock:
            if self._client is None:
                client = self._make_client()
                try:
                    await client.connect()
                except (aetcd.ClientError, OSError) as exc:
                    raise Unavailable(f"etcd at {self.endpoint} unreachable: {exc}") from exc
                self._client = client
            return self._client

    async def prefer(self, endpoint: str) -> None:
        """Put ``endpoint`` first and use it from the next call on (a server's own member, once
        it can answer: reads and writes then need no other host)."""
        async with self._lock:
            if self._endpoints[self._index] == endpoint:
                return
            if endpoint in self._endpoints:
                self._endpoints.remove(endpoint)
            self._endpoints.insert(0, endpoint)
            client, self._client = self._client, None
            self._index = 0
        if client is not None:
            # Calls in flight on the old channel finish first (closing it would cancel them).
            task = asyncio.create_task(self._close_later(client))
            self._retiring[task] = client
            task.add_done_callback(lambda t: self._retiring.pop(t, None))

    async def _close_later(self, client: aetcd.Client) -> None:
        await asyncio.sleep(self._timeout_s)
        try:
            await client.close()
        except Exception:  # closing a broken channel may raise anything
            log.debug("closing etcd client failed", exc_info=True)

    async def _failover(self, failed: aetcd.Client | None = None) -> None:
        async with self._lock:
            if failed is not None and self._client is not failed:
                return  # another call already moved on from that client
            client, self._client = self._client, None
            self._index = (self._index + 1) % len(self._endpoints)
        if client is not None:
            try:
                await client.close()
            except Exception:  # closing a broken channel may raise anything
                log.debug("closing etcd client failed", exc_info=True)

    async def _call(self, fn: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """Run ``fn`` with a client, translating aetcd errors (the one boundary)."""
        client = await self._connected()
        endpoint = self.endpoint
        try:
            return await fn(client)
        except aetcd.RevisionCompactedError as exc:
            raise Compacted(exc.compacted_revision) from exc
        except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError) as exc:
            await self._failover(client)
            raise Unavailable(f"etcd at {endpoint} unavailable: {exc}") from exc
        except aetcd.ClientError as exc:
            raise Unavailable(f"etcd error: {exc}") from exc
        except rpc.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.OUT_OF_RANGE and "compacted" in (exc.details() or ""):
                # A range pinned to a revision etcd has compacted (raw stub calls get the
                # gRPC status, not aetcd's error); etcd does not say how far it compacted.
                raise Compacted(0) from exc
            await self._failover(client)
            raise Unavailable(f"etcd error: {exc.details()}") from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task is being cancelled
            # grpc cancels the calls of a channel another call's failover closed
            raise Unavailable("etcd call cancelled: its connection was closed") from None

    async def close(self) -> None:
        async with self._lock:
            client, self._client = self._client, None
        for task, old in list(self._retiring.items()):
            task.cancel()
            try:
                await old.close()
            except Exception:  # closing a broken channel may raise anything
                log.debug("closing etcd client failed", exc_info=True)
        if client is not None:
            await client.close()

    # -- reads -----------------------------------------------------------------------------

    async def get(self, key: str, *, serializable: bool = False) -> KV | None:
        """One key. Concurrent gets share one read (see ``corral.state.batch``)."""
        return await self._reads.get(key, serializable)  # type: ignore[return-value]

    async def _read_many(self, keys: Sequence[str], serializable: bool) -> dict[str, KV]:
        if len(keys) == 1:
            # Alone: a plain range, as etcd answers it everywhere (a learner member serves
            # serializable ranges but no transactions).
            async def run(c: aetcd.Client) -> dict[str, KV]:
                got = await c.get(keys[0].encode(), serializable=serializable)
                return {} if got is None else {keys[0]: _kv(got)}

            return await self._call(run)
        found, _ = await self.get_many(keys, serializable=serializable)
        return found

    async def get_many(
        self, keys: Sequence[str], *, serializable: bool = False
    ) -> tuple[dict[str, KV], int]:
        """Read several keys at one revision (a transaction of ranges)."""
        if not keys:
            return {}, await self.revision()

        async def run(c: aetcd.Client) -> tuple[dict[str, KV], int]:
            req = rpc.TxnRequest(
                compare=[],
                success=[
                    rpc.RequestOp(
                        request_range=rpc.RangeRequest(key=k.encode(), serializable=serializable)
                    )
                    for k in keys
                ],
            )
            resp = await c.kvstub.Txn(req, timeout=self._timeout_s, metadata=c.metadata)
            found: dict[str, KV] = {}
            for r in resp.responses:
                for raw in r.response_range.kvs:
                    kv = _kv(raw)
                    found[kv.key] = kv
            return found, int(resp.header.revision)

        return await self._call(run)

    async def list(
        self,
        prefix: str,
        *,
        limit: int = 0,
        cursor: str | None = None,
        serializable: bool = False,
    ) -> Page:
        """One page of keys under ``prefix`` in key order, all read at one revision.

        ``limit=0`` reads everything. The cursor pins later pages to the first page's revision.
        """
        start = prefix
        revision = 0
        if cursor:
            revision, last_key = _decode_cursor(cursor)
            if not last_key.startswith(prefix):
                raise Malformed("cursor: belongs to another listing")
            start = last_key + "\0"

        async def run(c: aetcd.Client) -> Page:
            req = rpc.RangeRequest(
                key=start.encode(),
                range_end=prefix_range_end(prefix.encode()),
                limit=limit,
                revision=revision,
                serializable=serializable,
            )
            resp = await c.kvstub.Range(req, timeout=self._timeout_s, metadata=c.metadata)
            items = [_kv(raw) for raw in resp.kvs]
            rev = revision or int(resp.header.revision)
            nxt = make_cursor(rev, items[-1].key) if resp.more and items else None
            return Page(items=items, next_cursor=nxt, revision=rev)

        try:
            return await self._call(run)
        except Compacted:
            if not revision:
                raise
            revision = 0  # the pinned revision is gone: continue at the current one
            return await self._call(run)

    async def list_all(
        self, prefix: str, *, serializable: bool = False
    ) -> tuple[builtins.list[KV], int]:
        """Every key under ``prefix`` at one revision, read ``LIST_PAGE_KEYS`` at a time.

        Should that revision be compacted away half-way, the listing starts over at the
        current one (mixing pages of two revisions would not be one state)."""
        while True:
            page = await self.list(prefix, limit=LIST_PAGE_KEYS, serializable=serializable)
            items = page.items
            cursor = page.next_cursor
            while cursor:
                nxt = await self.list(
                    prefix, limit=LIST_PAGE_KEYS, cursor=cursor, serializable=serializable
                )
                if nxt.revision != page.revision:
                    break  # compacted under us: start over
                items += nxt.items
                cursor = nxt.next_cursor
            else:
                return items, page.revision

    async def revision(self) -> int:
        async def run(c: aetcd.Client) -> int:
            req = rpc.RangeRequest(key=b"/corral/v1/cluster", count_only=True)
            resp = await c.kvstub.Range(req, timeout=self._timeout_s, metadata=c.metadata)
            return int(resp.header.revision)

        return await self._call(run)

    # -- writes ----------------------------------------------------------------------------

    async def commit(self, ops: Sequence[Put | Delete], expect: Sequence[Expect] = ()) -> int:
        """Apply ``ops`` atomically if every expectation holds; return the new revision.

        Raises Conflict (nothing written) when an expectation fails, Unavailable on etcd errors.
        Concurrent commits may share one etcd transaction (see ``corral.state.batch``): the
        revision returned is then that of the shared transaction.
        """
        return await self._batcher.commit(ops, expect)

    async def _txn(self, ops: Sequence[Put | Delete], expect: Sequence[Expect]) -> int:

        def compare(e: Expect) -> Any:
            if e.create_revision is not None:
                return rpc.Compare(
                    key=e.key.encode(),
                    target=rpc.Compare.CREATE,
                    result=rpc.Compare.EQUAL,
                    create_revision=e.create_revision,
                )
            return rpc.Compare(
                key=e.key.encode(),
                target=rpc.Compare.MOD,
                result=rpc.Compare.EQUAL,
                mod_revision=e.mod_revision or 0,
            )

        def op(o: Put | Delete) -> Any:
            if isinstance(o, Put):
                return rpc.RequestOp(
                    request_put=rpc.PutRequest(key=o.key.encode(), value=o.value, lease=o.lease)
                )
            return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=o.key.encode()))

        req = rpc.TxnRequest(compare=[compare(e) for e in expect], success=[op(o) for o in ops])

        async def run(c: aetcd.Client) -> Any:
            return await c.kvstub.Txn(req, timeout=self._timeout_s, metadata=c.metadata)

        resp = await self._call(run)
        if not resp.succeeded:
            raise Conflict("the state changed concurrently: " + ", ".join(e.key for e in expect))
        return int(resp.header.revision)

    # -- watches ---------------------------------------------------------------------------

    async def watch(self, prefix: str, from_revision: int) -> AsyncIterator[WatchEvent]:
        """Yield every change under ``prefix`` after ``from_revision`` (exclusive)."""
        client = await self._connected()
        try:
            watch = await client.watch_prefix(prefix.encode(), start_revision=from_revision + 1)
        except aetcd.ClientError as exc:
            await self._failover(client)
            raise Unavailable(f"etcd watch failed: {exc}") from exc
        try:
            async for event in watch:
                kind = "put" if event.kind == "PUT" else "delete"
                yield WatchEvent(type=kind, kv=_kv(event.kv))
        except aetcd.RevisionCompactedError as exc:
            raise Compacted(exc.compacted_revision) from exc
        except (aetcd.ClientError, rpc.AioRpcError) as exc:
            await self._failover(client)
            raise Unavailable(f"etcd watch broke: {exc}") from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise Unavailable("etcd watch cancelled: its connection was closed") from None
        finally:
            try:
                await watch.cancel()
            except Exception:  # the stream may already be gone
                log.debug("cancelling watch failed", exc_info=True)

    # -- leases ----------------------------------------------------------------------------

    async def grant_lease(self, ttl_s: int) -> int:
        async def run(c: aetcd.Client) -> int:
            lease = await c.lease(ttl_s)
            return int(lease.id)

        return await self._call(run)

    async def keepalive(self, lease_id: int) -> int:
        """Refresh a lease; returns its remaining TTL in seconds, 0 when it has expired."""

        async def run(c: aetcd.Client) -> int:
            reply = await c.refresh_lease(lease_id)
            return 0 if reply is None else int(reply.TTL)

        return await self._call(run)

    async def revoke_lease(self, lease_id: int) -> None:
        async def run(c: aetcd.Client) -> None:
            try:
                await c.revoke_lease(lease_id)
            except aetcd.ClientError as exc:
                if "not found" not in str(exc):
                    raise

        await self._call(run)

    # -- cluster ---------------------------------------------------------------------------

    async def members(self) -> builtins.list[Member]:
        async def run(c: aetcd.Client) -> builtins.list[Member]:
            resp = await c.clusterstub.MemberList(
                rpc.MemberListRequest(), timeout=self._timeout_s, metadata=c.metadata
            )
            return [
                Member(
                    id=m.ID,
                    name=m.name,
                    peer_urls=list(m.peerURLs),
                    client_urls=list(m.clientURLs),
                    is_learner=bool(getattr(m, "isLearner", False)),
                )
                for m in resp.members
            ]

        return await self._call(run)

    async def add_member(self, peer_url: str, *, learner: bool = True) -> Member:
        """Add an etcd member (a learner by default: it votes only once promoted)."""

        async def run(c: aetcd.Client) -> Member:
            resp = await c.clusterstub.MemberAdd(
                rpc.MemberAddRequest(peerURLs=[peer_url], isLearner=learner),
                timeout=self._timeout_s,
                metadata=c.metadata,
            )
            m = resp.member
            return Member(m.ID, m.name, list(m.peerURLs), list(m.clientURLs), m.isLearner)

        return await self._member_call(run)

    async def promote_member(self, member_id: int) -> None:
        """Make a learner a voter; etcd refuses (Conflict) until it has caught up."""

        async def run(c: aetcd.Client) -> None:
            await c.clusterstub.MemberPromote(
                rpc.MemberPromoteRequest(ID=member_id),
                timeout=self._timeout_s,
                metadata=c.metadata,
            )

        await self._member_call(run)

    async def remove_member(self, member_id: int) -> None:
        async def run(c: aetcd.Client) -> None:
            await c.clusterstub.MemberRemove(
                rpc.MemberRemoveRequest(ID=member_id),
                timeout=self._timeout_s,
                metadata=c.metadata,
            )

        await self._member_call(run)

    async def _member_call(self, fn: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """Membership changes: etcd's refusals (not in sync, unhealthy cluster) are Conflicts."""
        client = await self._connected()
        try:
            return await fn(client)
        except rpc.AioRpcError as exc:
            code = exc.code().name
            if code in ("FAILED_PRECONDITION", "INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE") and (
                "learner" in (exc.details() or "")
                or "member" in (exc.details() or "")
                or "unhealthy" in (exc.details() or "")
            ):
                raise Conflict(f"etcd refused the membership change: {exc.details()}") from exc
            await self._failover(client)
            raise Unavailable(f"etcd membership call failed: {exc.details()}") from exc

    async def status(self) -> StoreStatus:
        async def run(c: aetcd.Client) -> StoreStatus:
            return await _status(c, self._timeout_s)

        return await self._call(run)

    async def member_status(self, client_url: str, *, timeout_s: float = 2.0) -> StoreStatus:
        """The status of the one member at ``client_url`` (its own raft index, its idea of the
        leader), over a connection of its own with this store's TLS. Unavailable when it does
        not answer within ``timeout_s``."""
        client = self._make_client(client_url)
        try:
            await client.connect()
            return await asyncio.wait_for(_status(client, timeout_s), timeout_s)
        except (aetcd.ClientError, rpc.AioRpcError, OSError, TimeoutError) as exc:
            detail = exc.details() if isinstance(exc, rpc.AioRpcError) else str(exc)
            raise Unavailable(f"etcd member at {client_url} did not answer: {detail}") from exc
        finally:
            try:
                await client.close()
            except Exception:  # a broken channel may fail to close; it is dropped anyway
                log.debug("closing a member status client failed", exc_info=True)

    async def member_healthy(self, client_url: str, *, timeout_s: float = 1.0) -> bool:
        """Whether the member at ``client_url`` answers and knows a leader."""
        try:
            return (await self.member_status(client_url, timeout_s=timeout_s)).leader_id != 0
        except Unavailable:
            return False


async def _status(c: aetcd.Client, timeout_s: float) -> StoreStatus:
    resp = await c.maintenancestub.Status(
        rpc.StatusRequest(), timeout=timeout_s, metadata=c.metadata
    )
    return StoreStatus(
        version=resp.version,
        leader_id=resp.leader,
        member_id=resp.header.member_id,
        raft_term=resp.raftTerm,
        raft_index=resp.raftIndex,
        db_size=resp.dbSize,
        revision=int(resp.header.revision),
    )
