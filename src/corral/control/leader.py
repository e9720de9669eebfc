"""Everything the elected leader runs, started on election and cancelled on deposition."""

from __future__ import annotations

import asyncio
import logging

from corral.control.context import ControlSettings, LeaderContext
from corral.control.gossip import GossipLoop, GossipView
from corral.control.informer import Informer
from corral.control.membership import MembershipLoop
from corral.control.migrations import MigrationLoop
from corral.control.nodes import NodeHealthLoop
from corral.control.operations import AUTO_KEY, OPERATION_ACTIONS, Mover, OperationLoop
from corral.control.placement import Allocation, AllocationLoop, PlacementLoop
from corral.control.queue import Outcome, WorkQueue
from corral.control.tasks import TaskLoop
from corral.control.vms import VmLoop
from corral.control.volumes import VolumeLoop
from corral.errors import CorralError
from corral.model import IdempotencyRecord, Node, Task, Volume, utcnow
from corral.state import Delete, Store, keys
from corral.state.codec import CodecError, decode

__all__ = ["LeaderLoops", "run_leader"]

log = logging.getLogger(__name__)

_VMS = keys.kind_prefix("vms")
_NODES = keys.kind_prefix("nodes")
_TASKS = keys.kind_prefix("tasks")
_ASSIGN = keys.PREFIX + "assign/"
_VOLUMES = keys.kind_prefix("volumes")
_MIGRATIONS = keys.kind_prefix("migrations")
_GROUPS = keys.kind_prefix("groups")


class LeaderLoops:
    """Routes cache changes to the loops' work queues; exposed for tests and status."""

    def __init__(
        self,
        store: Store,
        term: int,
        settings: ControlSettings,
        gossip_view: GossipView | None = None,
        mover: Mover | None = None,
    ) -> None:
        self.informer = Informer(store, keys.PREFIX)
        self.ctx = LeaderContext(store, self.informer, term, settings)
        self.placer = PlacementLoop(self.ctx, lambda: self.placement.add(PlacementLoop.KEY))
        self.placement = WorkQueue("placement", self.placer.reconcile)
        self.allocations = WorkQueue("allocation", AllocationLoop(self.ctx).reconcile)
        self.vms = WorkQueue("vm", VmLoop(self.ctx, self.placer).reconcile)
        # Drain and rebalance tasks; ``mover`` moves VMs (default: a cold relocation).
        self.operations = WorkQueue("operation", OperationLoop(self.ctx, mover).reconcile)
        self.tasks = WorkQueue("task", TaskLoop(self.ctx).reconcile)
        self.nodes = WorkQueue("node", NodeHealthLoop(self.ctx).reconcile)
        self.expiry = WorkQueue("expiry", self._expire_idempotency)
        self.membership = WorkQueue("membership", MembershipLoop(self.ctx).reconcile)
        self.volumes = WorkQueue("volume", VolumeLoop(self.ctx).reconcile)
        self.migrations = WorkQueue("migration", MigrationLoop(self.ctx).reconcile)
        self.gossip = (
            WorkQueue("gossip", GossipLoop(self.ctx, gossip_view).reconcile)
            if gossip_view is not None
            else None
        )
        self._tasks_by_vm: dict[str, set[str]] = {}
        # What placement read of each host record when last seen (spec, state, inventory).
        self._node_views: dict[str, tuple[object, ...]] = {}
        # Host allocation records as last seen: host key -> vm -> (vCPUs, MiB).
        self._allocs: dict[str, dict[str, tuple[int, int]]] = {}
        self.informer.subscribe(self._route)

    def _route(self, key: str) -> None:
        if self.informer.get(key) is None:
            self.ctx.forget(key)
        if key.startswith(_VMS):
            before = self.ctx.node_of(key)
            moved = self.ctx.track(key)
            after = self.ctx.node_of(key)
            name = keys.name_from_key(key)
            self.vms.add(name)
            if self.informer.get(keys.object_key("migrations", name)) is not None:
                self.migrations.add(name)
            # A status report changes no allocation: only a VM placed, moved, resized or gone.
            for node in ({before, after} - {None}) if moved else ():
                assert node is not None
                self.allocations.add(node)
            if before is not None and after is None:
                self.placer.poke()  # capacity was freed
            if self.informer.get(key) is None:
                self.placement.add("forget/" + name)
            for task_id in self._tasks_by_vm.get(name, set()):
                self.tasks.add(task_id)
        elif key.startswith(_TASKS):
            task_id = keys.name_from_key(key)
            kv = self.informer.get(key)
            if kv is None:
                return
            task = self.ctx.peek(Task, task_id)
            if task is not None and task.spec.action in OPERATION_ACTIONS:
                if not task.final:
                    self.operations.add(task_id)
                return
            if task is None or task.final:
                for ids in self._tasks_by_vm.values():
                    ids.discard(task_id)
                return
            self._tasks_by_vm.setdefault(task.spec.target.name, set()).add(task_id)
            self.tasks.add(task_id)
        elif key.startswith(_NODES):
            self.nodes.add(keys.name_from_key(key))
            if self._node_changed(key):
                self.placer.poke()
        elif key.startswith(keys.LIVENESS_PREFIX):
            self.nodes.add(keys.name_from_key(key))
            self.placer.poke()
        elif key.startswith(_MIGRATIONS):
            name = keys.name_from_key(key)
            self.migrations.add(name)
            self.vms.add(name)  # a migration that ended hands the VM back to the VM loop
        elif key.startswith(keys.ALLOC_PREFIX):
            if self._alloc_freed(key):
                self.placer.poke()
        elif key.startswith(_GROUPS) or key == keys.CLUSTER:
            self.placer.poke()
        elif key.startswith(_ASSIGN):
            self.vms.add(keys.name_from_key(key))
        elif key.startswith(_VOLUMES):
            name = keys.name_from_key(key)
            self.volumes.add(name)
            # The VM using the volume: its assignment says whether the file exists already.
            volume = self.ctx.peek(Volume, name)
            if volume is not None and volume.status.attached_to:
                self.vms.add(volume.status.attached_to)

    def _node_changed(self, key: str) -> bool:
        """Whether what placement reads of a host changed (its spec, state or inventory),
        not just its heartbeat or usage report: only then may a waiting VM fit now."""
        kv = self.informer.get(key)
        if kv is None:
            self._node_views.pop(key, None)
            return True
        node = self.ctx.peek(Node, keys.name_from_key(key))
        assert node is not None
        view = (node.spec, node.status.state, node.status.inventory)
        before = self._node_views.get(key)
        self._node_views[key] = view
        return before != view

    def _alloc_freed(self, key: str) -> bool:
        """Whether a host's allocation record now holds less than before (a VM left or
        shrank): only then can a VM that did not fit fit now. Placements only add to it."""
        kv = self.informer.get(key)
        now = Allocation.decode(kv).vms if kv is not None else {}
        before = self._allocs.get(key)
        if kv is None:
            self._allocs.pop(key, None)
        else:
            self._allocs[key] = now
        if before is None:
            return kv is None
        return any(
            name not in now or now[name][0] < c or now[name][1] < m
            for name, (c, m) in before.items()
        )

    async def _expire_idempotency(self, _: str) -> Outcome:
        now = utcnow()
        stale = []
        for kv in self.informer.under(keys.IDEMPOTENCY_PREFIX):
            try:
                record = decode("idempotency", kv.value, IdempotencyRecord)
            except CodecError:
                stale.append(kv.key)
                continue
            if record.expires_at <= now:
                stale.append(kv.key)
        for start in range(0, len(stale), 100):
            await self.ctx.commit([Delete(k) for k in stale[start : start + 100]])
        return Outcome(
            f"expired {len(stale)} idempotency records" if stale else "", requeue_after=600.0
        )

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.ctx.settings.resync_s)
            for kv in list(self.informer.under(keys.PREFIX)):
                if not kv.key.startswith(_TASKS):
                    self._route(kv.key)
            # Every host's allocation record against the VMs placed there (routing a VM that
            # did not change queues no such check).
            records = (keys.name_from_key(kv.key) for kv in self.informer.under(keys.ALLOC_PREFIX))
            for host in {*records, *self.ctx.placed_hosts()}:
                self.allocations.add(host)
            for ids in list(self._tasks_by_vm.values()):
                for task_id in list(ids):
                    self.tasks.add(task_id)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.informer.run(), name="informer")
            await self.informer.synced.wait()
            log.info("leader loops running (term %d)", self.ctx.term)
            queues = (
                self.vms,
                self.tasks,
                self.nodes,
                self.expiry,
                self.membership,
                self.volumes,
                self.migrations,
                self.placement,
                self.allocations,
                self.operations,
            )
            for q in queues:
                tg.create_task(q.run(), name=f"queue-{q.name}")
            self.expiry.add("idempotency")
            self.operations.add(AUTO_KEY)
            if self.ctx.settings.manage_etcd:
                self.membership.add("etcd")
            if self.gossip is not None:
                tg.create_task(self.gossip.run(), name="queue-gossip")
                self.gossip.add("serf")
            tg.create_task(self._resync(), name="resync")


async def run_leader(
    store: Store, term: int, settings: ControlSettings, gossip_view: GossipView | None = None
) -> None:
    try:
        await LeaderLoops(store, term, settings, gossip_view).run()
    except* CorralError as eg:
        log.error("leader loops stopped: %s", eg.exceptions[0])
        raise
