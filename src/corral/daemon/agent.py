"""The composition root of ``corral agent``: everything a host runs, in one process.

A server host runs its etcd member, the store, the REST and gRPC APIs, the leader election (and,
while elected, the leader loops), its Serf agent and its node agent. A compute-only host
(``--no-server``) runs its Serf agent, its node agent talking to the servers over gRPC, and a
REST front that forwards to the servers. Started in order; stopped in reverse on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Generator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from pydantic import ValidationError

from corral.agent.console import LocalConsoles
from corral.agent.disk_export import DiskExports
from corral.agent.drivers import Driver, QemuDriver
from corral.agent.drivers.fake import FakeDriver
from corral.agent.drivers.fake_migration import FakeMigrator
from corral.agent.drivers.qemu.migration import QemuMigrator
from corral.agent.inventory import collect_inventory
from corral.agent.migrations import Migrator
from corral.agent.nodeapi import NodeService as NodeServiceProtocol
from corral.agent.remote import RemoteNodeService
from corral.agent.runner import NodeAgent
from corral.agent.storage import GIB, HostStorage
from corral.api.grpc.node import start_grpc_server
from corral.api.rest.app import ApiServices, create_app
from corral.api.rest.proxy import create_proxy_app
from corral.cluster import EtcdConfig, EtcdSupervisor, LeaderElection
from corral.cluster.serf import SerfAgent, generate_key
from corral.cluster.serf_rpc import SerfClient
from corral.control import ControlSettings, run_leader
from corral.daemon.drivers import DriverSetupError, build_driver
from corral.daemon.identity import (
    NO_TLS,
    PKI_VERSION,
    ClusterIdentity,
    HostPki,
    JoinRefused,
    bootstrap_pki,
    join_cluster,
)
from corral.daemon.settings import AgentSettings
from corral.errors import Conflict, CorralError, DriverError, Malformed, Unavailable
from corral.model import ClusterConfig, ClusterInfo, Node, new_id, utcnow
from corral.model.assignment import AssignedDisk, AssignedImageFile
from corral.model.pki import ClusterPki
from corral.service.console import ConsoleService
from corral.service.console_tickets import ConsoleTickets
from corral.service.context import ServiceContext, ServiceSettings
from corral.service.groups import GroupService
from corral.service.join import JoinService
from corral.service.node_api import LocalNodeService
from corral.service.nodes import ClusterService, NodeService
from corral.service.operations import OperationService
from corral.service.placement import PlacementService
from corral.service.snapshots import SnapshotService
from corral.service.storage import ImageService, PoolService, VolumeService
from corral.service.tasks import TaskService
from corral.service.templates import TemplateService
from corral.service.tokens import TokenService
from corral.service.vms import VmService
from corral.state import Expect, Put, Store, keys
from corral.state.codec import encode

__all__ = ["Agent", "AgentStartError"]

log = logging.getLogger(__name__)


def _migrator(driver: Driver, fake_delay_s: float) -> Migrator | None:
    """The driver's live migration, if it has one."""
    if isinstance(driver, QemuDriver):
        return QemuMigrator(driver)
    if isinstance(driver, FakeDriver):
        return FakeMigrator(driver, transfer_delay_s=fake_delay_s)
    return None


_JOIN_START_ATTEMPTS = 5


class AgentStartError(RuntimeError):
    """The agent cannot start; the message says what to do."""


class _ApiServer(uvicorn.Server):
    # The agent owns SIGTERM/SIGINT and stops uvicorn itself.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _tail(path: Path, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            return fh.read()
    except FileNotFoundError:
        return b""


def _console_tickets(identity: ClusterIdentity) -> ConsoleTickets | None:
    """Console tickets signed with a key every host derives from the cluster's gossip key."""
    return ConsoleTickets.from_secret(identity.gossip_key) if identity.gossip_key else None


class _SerfView:
    """The leader's view of gossip: its own Serf agent's member list (reconnects as needed)."""

    def __init__(self, rpc_port: int) -> None:
        self.rpc_port = rpc_port
        self._client: SerfClient | None = None

    async def __call__(self) -> dict[str, str]:
        if self._client is None or self._client.closed:
            self._client = await SerfClient.connect(f"127.0.0.1:{self.rpc_port}", timeout_s=5.0)
        try:
            members = await self._client.members()
        except CorralError:
            await self.close()
            raise
        return {m.name: m.status for m in members}

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.s = settings
        self.data_dir = settings.data_dir.resolve()
        self.identity: ClusterIdentity | None = None
        self.etcd: EtcdSupervisor | None = None
        self.store: Store | None = None
        self.serf: SerfAgent | None = None
        self.node_agent: NodeAgent | None = None
        self.election: LeaderElection | None = None
        self.remote: RemoteNodeService | None = None
        self.driver: Driver | None = None
        self.storage: HostStorage | None = None
        self.consoles: LocalConsoles | None = None
        self.exports: DiskExports | None = None
        self._stop = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._etcd_learner = False

    def request_stop(self) -> None:
        self._stop.set()

    def _spawn(self, work: Awaitable[None]) -> None:
        """Run ``work`` in the background (an image download); cancelled at shutdown."""

        async def run() -> None:
            await work

        task = asyncio.create_task(run(), name="background")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- becoming a member -------------------------------------------------------------------

    async def _identity(self) -> ClusterIdentity:
        """Who this host is in which cluster: remembered, bootstrapped, or joined now."""
        s = self.s
        try:
            known = ClusterIdentity.load(self.data_dir)
        except JoinRefused as exc:
            raise AgentStartError(str(exc)) from exc
        if known is not None:
            if s.bootstrap or s.join:
                log.info(
                    "%s already belongs to cluster %s; ignoring --bootstrap/--join",
                    self.data_dir,
                    known.cluster_id,
                )
            return known
        if (self.data_dir / "etcd" / "member").exists():
            # An etcd member but no cluster.json: a data dir from before TLS.
            raise AgentStartError(NO_TLS.format(where=self.data_dir))
        if s.bootstrap or s.etcd_endpoint_list:
            # The CAs are made here; they and the cluster record go to etcd once it runs.
            secret, _ = bootstrap_pki(self.data_dir, s.name, [s.bind])
            identity = ClusterIdentity(
                cluster_id="", role="server", gossip_key="", pki=PKI_VERSION, pki_secret=secret
            )
            identity.save(self.data_dir)
            return identity
        if not s.join:
            raise AgentStartError(
                f"{self.data_dir} holds no cluster: pass --bootstrap to create one here, or "
                "--join ADDR --token TOKEN to join one (or --data-dir to point at an existing one)"
            )
        fields: dict[str, Any] = {
            "api_url": s.api_url,
            "grpc_url": s.grpc_url,
            "gossip_address": s.gossip_address,
        }
        if s.role == "server":
            fields["etcd_peer_url"] = f"https://{s.bind}:{s.etcd_peer_port}"
            fields["etcd_client_url"] = f"https://{s.bind}:{s.etcd_client_port}"
        try:
            answer, files = await join_cluster(s.join, s.token, fields, name=s.name, role=s.role)
        except JoinRefused as exc:
            raise AgentStartError(str(exc)) from exc
        HostPki(self.data_dir).save(files)
        identity = ClusterIdentity(
            cluster_id=answer["cluster_id"],
            role=s.role,
            gossip_key=answer["gossip_key"],
            servers=answer["servers"],
            gossip_peers=answer["gossip_peers"],
            etcd_initial_cluster=(answer.get("etcd") or {}).get("initial_cluster", ""),
            pki=PKI_VERSION,
            pki_secret=str(answer.get("pki_secret") or ""),
        )
        identity.save(self.data_dir)
        log.info("joined cluster %s as a %s host", identity.cluster_id, s.role)
        return identity

    async def _start_etcd(self, identity: ClusterIdentity) -> list[str]:
        s = self.s
        if s.etcd_endpoint_list:
            return s.etcd_endpoint_list
        cfg = EtcdConfig(
            name=s.name,
            data_dir=self.data_dir,
            bind=s.bind,
            client_port=s.etcd_client_port,
            peer_port=s.etcd_peer_port,
            initial_cluster=identity.etcd_initial_cluster,
            tls=HostPki(self.data_dir).etcd_files(),
        )
        for attempt in range(1, _JOIN_START_ATTEMPTS + 1):
            self.etcd = EtcdSupervisor(cfg)
            try:
                # A joining learner has to fetch the leader's snapshot first: give it time.
                await self.etcd.start(timeout_s=120.0 if identity.etcd_initial_cluster else 30.0)
                break
            except RuntimeError as exc:
                # Right after the servers added this member, the peer the new member asks may
                # not have applied that change yet ("member count is unequal"): it will have
                # in a moment, so start afresh rather than give up.
                racing = identity.etcd_initial_cluster and "member count is unequal" in str(exc)
                if not racing or attempt == _JOIN_START_ATTEMPTS:
                    raise AgentStartError(str(exc)) from exc
                log.warning(
                    "etcd member not yet known to its peers (attempt %d); retrying", attempt
                )
                shutil.rmtree(cfg.member_dir / "member", ignore_errors=True)
                await asyncio.sleep(attempt)
        others = [u for u in identity.etcd_client_urls if u != cfg.client_url]
        self._etcd_learner = bool(identity.etcd_initial_cluster)
        if identity.etcd_initial_cluster:
            # A new member is a learner still catching up: it cannot answer reads yet.
            return [*others, cfg.client_url]
        return [cfg.client_url, *others]

    async def _ensure_cluster(self, store: Store, identity: ClusterIdentity) -> ClusterIdentity:
        """Read (or, at bootstrap, write) the cluster record; remember it in cluster.json."""
        from corral.state.codec import decode

        kv = await store.get(keys.CLUSTER)
        bootstrap_file = HostPki(self.data_dir).dir / "bootstrap.json"
        if kv is None:
            if not self.s.bootstrap:
                raise AgentStartError(
                    "the etcd cluster holds no corral cluster: pass --bootstrap to create one"
                )
            try:
                record = ClusterPki.model_validate_json(bootstrap_file.read_bytes())
            except (OSError, ValidationError) as exc:
                raise AgentStartError(
                    f"{bootstrap_file} (the new cluster's CAs) is unreadable: {exc}; start from "
                    "a new --data-dir"
                ) from exc
            info = ClusterInfo(
                id=new_id(),
                name="corral",
                created_at=utcnow(),
                bootstrap_node=self.s.name,
                gossip_key=generate_key(),
                config=ClusterConfig(
                    desired_voters=self.s.desired_voters,  # type: ignore[arg-type]
                    server_dead_grace_s=self.s.server_dead_grace_s,
                ),
            )
            with contextlib.suppress(Conflict):
                await store.commit(
                    [
                        Put(keys.CLUSTER, encode("cluster", info)),
                        Put(keys.PKI, encode("pki", record)),
                    ],
                    [Expect.missing(keys.CLUSTER), Expect.missing(keys.PKI)],
                )
                log.info("bootstrapped cluster %s", info.id)
            kv = await store.get(keys.CLUSTER)
            assert kv is not None
        pki_kv = await store.get(keys.PKI)
        if pki_kv is None:
            raise AgentStartError(NO_TLS.format(where="the cluster in etcd"))
        ca = decode("pki", pki_kv.value, ClusterPki).ca_cert
        if HostPki(self.data_dir).read("ca.crt").decode().strip() != ca.strip():
            raise AgentStartError(
                f"this host's certificates ({HostPki(self.data_dir).dir}) are of another CA "
                "than the cluster's in etcd; start from a new --data-dir and join again"
            )
        bootstrap_file.unlink(missing_ok=True)
        info = decode("cluster", kv.value, ClusterInfo)
        if not info.gossip_key:
            # A cluster made before gossip existed: give it a key once.
            info.gossip_key = generate_key()
            with contextlib.suppress(Conflict):
                await store.commit(
                    [Put(keys.CLUSTER, encode("cluster", info))], [Expect.unchanged(kv)]
                )
        identity.cluster_id = info.id
        identity.gossip_key = identity.gossip_key or info.gossip_key
        identity.etcd_initial_cluster = ""  # used once: the member now has its data
        identity.save(self.data_dir)
        return identity

    async def _record_addresses(self, ctx: ServiceContext) -> None:
        """Keep this server's node record's addresses current (join and restarts)."""
        s = self.s

        def update(node: Node) -> Node | None:
            scheme = self.etcd.config.scheme if self.etcd is not None else "http"
            want = (
                s.grpc_url,
                s.gossip_address,
                f"{scheme}://{s.bind}:{s.etcd_peer_port}",
                f"{scheme}://{s.bind}:{s.etcd_client_port}",
            )
            st = node.status
            if (st.grpc_address, st.gossip_address, st.etcd_peer_url, st.etcd_client_url) == want:
                return None
            st.grpc_address, st.gossip_address, st.etcd_peer_url, st.etcd_client_url = want
            return node

        # The node agent registers the record moments after start: wait for it.
        for _ in range(600):
            try:
                await ctx.objects.update(Node, s.name, update)
                return
            except CorralError:
                await asyncio.sleep(0.5)
        log.warning("could not record this server's addresses in its node record")

    async def _prefer_own_etcd(self, store: Store) -> None:
        """A server that joined starts with the other servers' etcd endpoints first (its own
        member is a learner that cannot answer yet). Once it is a voter, its own comes first:
        otherwise a cut from the server it uses would stall its first calls for a timeout."""
        etcd = self.etcd
        assert etcd is not None
        while True:
            await asyncio.sleep(2.0)
            try:
                mine = [m for m in await store.members() if etcd.config.peer_url in m.peer_urls]
            except CorralError:
                continue
            if mine and not mine[0].is_learner:
                await store.prefer(etcd.config.client_url)
                log.info("etcd member promoted: using it first (%s)", etcd.config.client_url)
                return

    # -- consoles ----------------------------------------------------------------------------

    async def _fetch_image_file(self, f: AssignedImageFile) -> AsyncIterator[bytes]:
        """An image file's bytes from the first server that serves them."""
        urls = [self.s.api_url] if self.store is not None else []
        urls += self.identity.server_api_urls if self.identity else []
        errors = []
        for base in dict.fromkeys(urls):
            url = f"{base.rstrip('/')}/api/v1/images/{f.image}/files/{f.file}"
            try:
                async with (
                    httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=120.0)) as client,
                    client.stream("GET", url) as resp,
                ):
                    if resp.status_code != 200:
                        errors.append(f"{base} answered {resp.status_code}")
                        continue
                    async for chunk in resp.aiter_bytes():
                        yield chunk
                    return
            except httpx.HTTPError as exc:
                errors.append(f"{base}: {exc or type(exc).__name__}")
        raise Unavailable("no server served it: " + "; ".join(errors or ["no server known"]))

    async def local_storage(self, op: dict[str, Any]) -> dict[str, Any]:
        """One storage operation on this host's own disks (see ``api/rest/storage.py``)."""
        storage = self.storage
        if storage is None:
            raise Unavailable("this host's storage is not ready yet")
        kind = op.get("op")
        try:
            disk = AssignedDisk.model_validate(op.get("disk"))
        except ValidationError as exc:
            raise Malformed(f"disk: {exc}") from None
        path = storage.volume_path(disk)
        if kind == "create":
            path = await storage.ensure_volume(disk)
            return {"path": str(path), "allocated_bytes": storage.allocated_bytes(path)}
        if kind == "resize":
            size_gib = op.get("size_gib")
            if not isinstance(size_gib, int) or size_gib < disk.size_gib:
                raise Malformed("size_gib: must be an integer, at least the current size")
            vm = op.get("vm")
            grown = False
            if isinstance(vm, str) and isinstance(self.driver, QemuDriver):
                with contextlib.suppress(DriverError):
                    if vm in {v.name for v in await self.driver.list()}:
                        grown = await self.driver.resize_disk(vm, disk.volume, size_gib * GIB)
            if not grown:
                await storage.resize(path, size_gib)
            return {"path": str(path), "size_gib": size_gib, "online": grown}
        if kind == "delete":
            return {"deleted": storage.delete(path), "path": str(path)}
        raise Malformed(f"op: must be create, resize or delete, not {kind!r}")

    async def local_vms(self, op: dict[str, Any]) -> dict[str, Any]:
        """A snapshot or disk-copy operation on this host's hypervisor (``service/snapshots.py``,
        ``service/templates.py`` call it on the VM's host)."""
        from corral.agent.vm_ops import run_vm_op

        if self.storage is None or self.driver is None:
            raise Unavailable("this host's hypervisor is not ready yet")
        if self.exports is None:
            # Disks go to other hosts over this host's own address only.
            self.exports = DiskExports(self.s.bind, self.data_dir / "run")
        return await run_vm_op(self.driver, self.storage, op, exports=self.exports)

    async def local_console(self, name: str, max_bytes: int) -> bytes | None:
        """The tail of a VM's console log on this host; None when it has none here."""
        if not isinstance(self.driver, QemuDriver):
            return None
        try:
            path = self.driver.console_log_path(name)
        except DriverError:
            return None
        return await asyncio.to_thread(_tail, path, max_bytes)

    # -- health ------------------------------------------------------------------------------

    async def readiness(self) -> list[str]:
        reasons = []
        if self.etcd is not None and not self.etcd.healthy:
            reasons.append("the local etcd member is not healthy (restarting)")
        if self.store is not None:
            try:
                await asyncio.wait_for(self.store.get(keys.CLUSTER), 2.0)
            except (CorralError, TimeoutError) as exc:
                reasons.append(f"the state store is unreachable: {exc}")
        if self.node_agent is not None and self.node_agent.lease_id is None:
            reasons.append("this node holds no liveness lease yet (registering)")
        return reasons

    # -- run ---------------------------------------------------------------------------------

    async def run(self) -> None:
        s = self.s
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The driver first: a host that cannot run VMs should not join or start etcd.
        try:
            driver = self.driver = build_driver(s, self.data_dir / "driver")
        except DriverSetupError as exc:
            raise AgentStartError(str(exc)) from exc
        identity = self.identity = await self._identity()
        host_pki = HostPki(self.data_dir)
        storage = self.storage = HostStorage(self.data_dir, fetch=self._fetch_image_file)
        # The default pool's directory, so the inventory shows its capacity from the start.
        storage.pool_dir("local", None).mkdir(parents=True, exist_ok=True)
        tasks: list[asyncio.Task[Any]] = []
        grpc_server = None
        consoles = self.consoles = LocalConsoles(driver, s.name)
        if identity.role == "server":
            endpoints = await self._start_etcd(identity)
            # Our own etcd speaks TLS only; an etcd the user runs (--etcd-endpoints) is theirs.
            etcd_tls = None if s.etcd_endpoint_list else host_pki.etcd_tls()
            store = self.store = Store(endpoints, tls=etcd_tls)
            try:
                identity = self.identity = await self._ensure_cluster(store, identity)
            except CorralError as exc:
                raise AgentStartError(f"cannot reach etcd: {exc}") from exc
            ctx = ServiceContext(store, ServiceSettings(task_timeout_s=s.task_timeout_s))
            try:
                await PoolService(ctx).ensure_default()
            except CorralError as exc:
                raise AgentStartError(f"cannot reach etcd: {exc}") from exc
            placement = PlacementService(ctx, s.cpu_allocation_ratio, s.memory_allocation_ratio)
            app = create_app(
                ApiServices(
                    vms=VmService(ctx, placement),
                    tasks=TaskService(ctx),
                    nodes=NodeService(ctx),
                    cluster=ClusterService(ctx),
                    tokens=TokenService(ctx),
                    join=JoinService(ctx, pki_secret=identity.pki_secret),
                    console=ConsoleService(
                        ctx,
                        s.name,
                        self.local_console,
                        tickets=_console_tickets(identity),
                        open_local=consoles.open,
                    ),
                    readiness=self.readiness,
                    pools=PoolService(ctx),
                    volumes=VolumeService(ctx),
                    images=ImageService(
                        ctx,
                        s.name,
                        storage,
                        max_bytes=s.image_max_gib * GIB,
                        allow_private_urls=s.image_allow_private_urls,
                        spawn=self._spawn,
                    ),
                    local_storage=self.local_storage,
                    snapshots=SnapshotService(ctx, spawn=self._spawn),
                    templates=TemplateService(ctx),
                    local_vms=self.local_vms,
                    placement=placement,
                    groups=GroupService(ctx),
                    operations=OperationService(ctx, placement),
                )
            )
            local = LocalNodeService(ctx)
            node_service: NodeServiceProtocol = local
            grpc_server = await start_grpc_server(
                s.bind,
                s.grpc_port,
                local,
                cluster_id=identity.cluster_id,
                credentials=host_pki.grpc_server(),
            )
            control = ControlSettings(
                cpu_allocation_ratio=s.cpu_allocation_ratio,
                memory_allocation_ratio=s.memory_allocation_ratio,
                node_down_after_s=s.node_down_after_s,
                task_timeout_s=s.task_timeout_s,
                manage_etcd=not s.etcd_endpoint_list,
            )
            self.election = LeaderElection(store, s.name, s.api_url, ttl_s=s.leader_ttl_s)
        else:
            self.remote = RemoteNodeService(
                identity.server_grpc_urls,
                cluster_id=identity.cluster_id,
                credentials=host_pki.grpc_client(),
            )
            node_service = self.remote
            app = create_proxy_app(
                lambda: identity.server_api_urls,
                self.readiness,
                self.local_console,
                local_storage=self.local_storage,
                local_vms=self.local_vms,
                tickets=_console_tickets(identity),
                open_local=consoles.open,
            )

        try:
            self.serf = SerfAgent(
                s.name,
                s.bind,
                s.gossip_port,
                s.gossip_rpc_port,
                self.data_dir,
                encrypt_key=identity.gossip_key,
                tags={"role": identity.role, "api": s.api_url, "grpc": s.grpc_url},
                join=identity.gossip_peers,
            )
            await self.serf.start()
        except (CorralError, RuntimeError, OSError, ValueError) as exc:
            raise AgentStartError(f"the gossip agent (serf) did not start: {exc}") from exc

        host_cpu = await driver.host_cpu()
        self.node_agent = NodeAgent(
            s.name,
            node_service,
            driver,
            address=s.api_url,
            labels=s.label_dict(),
            roles=["server", "compute"] if identity.role == "server" else ["compute"],
            inventory=collect_inventory(self.data_dir, driver.name, cpu=host_cpu),
            lease_ttl_s=s.lease_ttl_s,
            storage=storage,
            inventory_refresh=lambda pools: collect_inventory(
                self.data_dir, driver.name, pools, host_cpu
            ),
            migrator=_migrator(driver, s.fake_migrate_delay_s),
        )
        server = _ApiServer(
            uvicorn.Config(
                app,
                host=s.bind,
                port=s.http_port,
                log_config=None,
                lifespan="off",
                access_log=False,
                # No proxy in front of the API is trusted to say who the client is.
                proxy_headers=False,
                timeout_graceful_shutdown=5,
            )
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        (self.data_dir / "agent.pid").write_text(str(os.getpid()))

        tasks.append(asyncio.create_task(server.serve(), name="api"))
        tasks.append(asyncio.create_task(self.node_agent.run(), name="node-agent"))
        if self.election is not None and self.store is not None:
            store = self.store
            view = _SerfView(s.gossip_rpc_port)

            async def lead(term: int) -> None:
                try:
                    await run_leader(store, term, control, view)
                finally:
                    await view.close()

            tasks.append(asyncio.create_task(self.election.run(lead), name="election"))
            # Not in ``tasks``: it ends once done, which must not stop the agent.
            self._background.add(
                asyncio.create_task(
                    self._record_addresses(ServiceContext(store)), name="record-addresses"
                )
            )
            if self._etcd_learner and self.etcd is not None:
                self._background.add(
                    asyncio.create_task(self._prefer_own_etcd(store), name="prefer-own-etcd")
                )
        stopper = asyncio.create_task(self._stop.wait(), name="stop")
        log.info(
            "corral agent %s (%s) serving %s (driver %s)",
            s.name,
            identity.role,
            s.api_url,
            s.driver,
        )
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t is not stopper]
        for t in failed:
            if not t.cancelled() and t.exception() is not None:
                log.error("%s stopped unexpectedly", t.get_name(), exc_info=t.exception())
        await self._shutdown(server, grpc_server, tasks, stopper)
        if failed:
            raise AgentStartError(f"{failed[0].get_name()} stopped unexpectedly; see the log")

    async def _leave(self) -> None:
        """--leave: tell the servers this host is gone for good (its etcd member goes too)."""
        import httpx

        urls = [self.s.api_url] if self.store is not None else []
        urls += self.identity.server_api_urls if self.identity else []
        async with httpx.AsyncClient(timeout=5.0) as client:
            for base in dict.fromkeys(urls):
                with contextlib.suppress(httpx.HTTPError):
                    r = await client.post(f"{base}/api/v1/nodes/{self.s.name}/leave")
                    if r.status_code < 500:
                        log.info("left the cluster (%s)", r.status_code)
                        return
        log.warning("could not tell any server that this host leaves; run `corral node remove`")

    async def _shutdown(
        self,
        server: uvicorn.Server,
        grpc_server: Any,
        tasks: list[asyncio.Task[Any]],
        stopper: asyncio.Task[bool],
    ) -> None:
        log.info("shutting down")
        stopper.cancel()
        for t in self._background:
            t.cancel()
        if self.s.leave:
            await self._leave()
        if self.node_agent is not None:
            # grpc may surface a closing channel as CancelledError; shutdown goes on regardless.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                # The lease is left to expire: VMs keep running through an agent restart, so
                # the node must not look gone at once; --leave revokes it.
                await asyncio.wait_for(
                    self.node_agent.shutdown(revoke_lease=self.s.leave, timeout_s=3.0), 5.0
                )
        if self.election is not None:
            await self.election.resign()
        if self.consoles is not None:
            with contextlib.suppress(Exception):
                await self.consoles.close()
        if self.exports is not None:
            with contextlib.suppress(Exception):
                await self.exports.close(self.driver)
        server.should_exit = True
        for t in tasks:
            if t.get_name() != "api":
                t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 10.0)
        if grpc_server is not None:
            with contextlib.suppress(Exception):
                await grpc_server.stop(grace=2.0)
        if self.remote is not None:
            with contextlib.suppress(Exception):
                await self.remote.close()
        if self.serf is not None:
            with contextlib.suppress(Exception):
                await self.serf.stop(leave=self.s.leave)
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()
        if self.etcd is not None:
            await self.etcd.stop()
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "agent.pid").unlink()
        log.info("stopped")
