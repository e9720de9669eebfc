"""The composition root of ``corral agent``: etcd, the store, the API, the leader loops and
the node agent in one process, started in order and stopped in reverse on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Generator

import uvicorn

from corral.agent.drivers import make_driver
from corral.agent.inventory import collect_inventory
from corral.agent.runner import NodeAgent
from corral.api.rest.app import ApiServices, create_app
from corral.cluster import EtcdConfig, EtcdSupervisor, LeaderElection
from corral.control import ControlSettings, run_leader
from corral.daemon.settings import AgentSettings
from corral.errors import Conflict, CorralError
from corral.model import ClusterInfo, new_id, utcnow
from corral.service.context import ServiceContext, ServiceSettings
from corral.service.node_api import LocalNodeService
from corral.service.nodes import ClusterService, NodeService
from corral.service.tasks import TaskService
from corral.service.vms import VmService
from corral.state import Expect, Put, Store, keys
from corral.state.codec import encode

__all__ = ["Agent", "AgentStartError"]

log = logging.getLogger(__name__)


class AgentStartError(RuntimeError):
    """The agent cannot start; the message says what to do."""


class _ApiServer(uvicorn.Server):
    # The agent owns SIGTERM/SIGINT and stops uvicorn itself.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.s = settings
        self.data_dir = settings.data_dir.resolve()
        self.etcd: EtcdSupervisor | None = None
        self.store: Store | None = None
        self.node_agent: NodeAgent | None = None
        self.election: LeaderElection | None = None
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def _start_store(self) -> Store:
        s = self.s
        endpoints = s.etcd_endpoint_list
        if not endpoints:
            cfg = EtcdConfig(
                name=s.name,
                data_dir=self.data_dir,
                bind=s.bind,
                client_port=s.etcd_client_port,
                peer_port=s.etcd_peer_port,
            )
            fresh = not (cfg.member_dir / "member").exists()
            if fresh and not s.bootstrap:
                raise AgentStartError(
                    f"{self.data_dir} holds no cluster: pass --bootstrap to create one here, "
                    "or --data-dir to point at an existing one"
                )
            self.etcd = EtcdSupervisor(cfg)
            try:
                await self.etcd.start()
            except RuntimeError as exc:
                raise AgentStartError(str(exc)) from exc
            endpoints = [cfg.client_url]
        return Store(endpoints)

    async def _ensure_cluster(self, store: Store) -> None:
        kv = await store.get(keys.CLUSTER)
        if kv is not None:
            return
        if not self.s.bootstrap:
            raise AgentStartError(
                "the etcd cluster holds no corral cluster: pass --bootstrap to create one"
            )
        info = ClusterInfo(
            id=new_id(), name="corral", created_at=utcnow(), bootstrap_node=self.s.name
        )
        with contextlib.suppress(Conflict):
            await store.commit(
                [Put(keys.CLUSTER, encode("cluster", info))], [Expect.missing(keys.CLUSTER)]
            )
            log.info("bootstrapped cluster %s", info.id)

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

    async def run(self) -> None:
        s = self.s
        self.data_dir.mkdir(parents=True, exist_ok=True)
        store = self.store = await self._start_store()
        try:
            await self._ensure_cluster(store)
        except CorralError as exc:
            raise AgentStartError(f"cannot reach etcd: {exc}") from exc

        ctx = ServiceContext(store, ServiceSettings(task_timeout_s=s.task_timeout_s))
        app = create_app(
            ApiServices(
                vms=VmService(ctx),
                tasks=TaskService(ctx),
                nodes=NodeService(ctx),
                cluster=ClusterService(ctx),
                readiness=self.readiness,
            )
        )
        server = _ApiServer(
            uvicorn.Config(
                app,
                host=s.bind,
                port=s.http_port,
                log_config=None,
                lifespan="off",
                access_log=False,
                timeout_graceful_shutdown=5,
            )
        )
        driver = make_driver(
            s.driver,
            state_dir=self.data_dir / "driver",
            start_delay_s=s.fake_start_delay_s,
            stop_delay_s=s.fake_stop_delay_s,
            fail_start=s.fake_fail_start,
        )
        self.node_agent = NodeAgent(
            s.name,
            LocalNodeService(ctx),
            driver,
            address=s.api_url,
            labels=s.label_dict(),
            roles=["server", "compute"],
            inventory=collect_inventory(self.data_dir, driver.name),
            lease_ttl_s=s.lease_ttl_s,
        )
        control = ControlSettings(
            cpu_allocation_ratio=s.cpu_allocation_ratio,
            memory_allocation_ratio=s.memory_allocation_ratio,
            node_down_after_s=s.node_down_after_s,
            task_timeout_s=s.task_timeout_s,
        )
        self.election = LeaderElection(store, s.name, s.api_url, ttl_s=s.leader_ttl_s)
        election = self.election

        async def lead(term: int) -> None:
            await run_leader(store, term, control)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        (self.data_dir / "agent.pid").write_text(str(os.getpid()))

        tasks = [
            asyncio.create_task(server.serve(), name="api"),
            asyncio.create_task(election.run(lead), name="election"),
            asyncio.create_task(self.node_agent.run(), name="node-agent"),
        ]
        stopper = asyncio.create_task(self._stop.wait(), name="stop")
        log.info("corral agent %s serving %s (driver %s)", s.name, s.api_url, s.driver)
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t is not stopper]
        for t in failed:
            if not t.cancelled() and t.exception() is not None:
                log.error("%s stopped unexpectedly", t.get_name(), exc_info=t.exception())
        await self._shutdown(server, tasks, stopper)
        if failed:
            raise AgentStartError(f"{failed[0].get_name()} stopped unexpectedly; see the log")

    async def _shutdown(
        self, server: uvicorn.Server, tasks: list[asyncio.Task[None]], stopper: asyncio.Task[bool]
    ) -> None:
        log.info("shutting down")
        stopper.cancel()
        server.should_exit = True
        if self.node_agent is not None:
            # grpc may surface a closing channel as CancelledError; shutdown goes on regardless.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                # The lease is left to expire: VMs keep running through an agent restart, so the
                # node must not look gone at once (``--leave`` will revoke it).
                await asyncio.wait_for(self.node_agent.shutdown(timeout_s=3.0), 5.0)
        if self.election is not None:
            await self.election.resign()
        for t in tasks:
            if t.get_name() != "api":
                t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 10.0)
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()
        if self.etcd is not None:
            await self.etcd.stop()
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "agent.pid").unlink()
        log.info("stopped")
