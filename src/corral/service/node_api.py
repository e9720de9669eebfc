"""The server side of the NodeService (see ``corral.agent.nodeapi``), in-process.

Node reports are observations: they only ever write a VM's ``status``, and only when the
report's epoch is the VM's current placement epoch.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

from corral.errors import Conflict, CorralError, NotFound
from corral.model import (
    Assignment,
    Inventory,
    Migration,
    Node,
    NodeSpec,
    NodeStatus,
    Vm,
    VmObservation,
    Volume,
    new_id,
    utcnow,
)
from corral.service.context import ServiceContext
from corral.state import KV, Compacted, Objects, Put, keys
from corral.state.codec import CodecError, decode

__all__ = ["LocalNodeService"]

log = logging.getLogger(__name__)
_HEARTBEAT_EVERY = timedelta(seconds=5)


class LocalNodeService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self._last_beat: dict[str, object] = {}

    async def register(
        self,
        node: str,
        *,
        address: str,
        driver: str,
        inventory: Inventory,
        labels: dict[str, str],
        roles: list[str],
    ) -> None:
        objects = self.ctx.objects
        now = utcnow()
        spec = NodeSpec.model_validate({"labels": labels, "roles": roles})
        existing = await objects.find(Node, node)
        if existing is None:
            record = Node(
                name=node,
                id=new_id(),
                created_at=now,
                updated_at=now,
                spec=spec,
                status=NodeStatus(
                    address=address, driver=driver, inventory=inventory, registered_at=now
                ),
            )
            try:
                await self.ctx.store.commit(
                    [Objects.put(record)], [Objects.expect_missing(Node, node)]
                )
                return
            except Conflict:
                pass  # registered concurrently: refresh it below

        def refresh(n: Node) -> Node:
            # Keep what was set through the API (cordon, maintenance, reservations, ratios).
            n.spec = n.spec.model_copy(update={"labels": spec.labels, "roles": spec.roles})
            n.status.address = address
            n.status.driver = driver
            n.status.inventory = inventory
            n.status.registered_at = now
            return n

        await objects.update(Node, node, refresh)

    async def open_liveness(self, node: str, ttl_s: int) -> int:
        lease = await self.ctx.store.grant_lease(ttl_s)
        value = json.dumps({"node": node, "since": utcnow().isoformat()}).encode()
        await self.ctx.store.commit([Put(keys.liveness_key(node), value, lease=lease)])
        await self._beat(node)
        return lease

    async def keepalive(self, node: str, lease_id: int) -> int:
        ttl = await self.ctx.store.keepalive(lease_id)
        if ttl > 0 and node:
            await self._beat(node)
        return ttl

    async def _beat(self, node: str) -> None:
        now = utcnow()
        last = self._last_beat.get(node)
        if isinstance(last, type(now)) and now - last < _HEARTBEAT_EVERY:
            return
        self._last_beat[node] = now

        def beat(n: Node) -> Node:
            n.status.heartbeat_at = now
            return n

        try:
            await self.ctx.objects.update(Node, node, beat)
        except NotFound:
            log.warning("heartbeat for unregistered node %s", node)

    async def close_liveness(self, node: str, lease_id: int) -> None:
        await self.ctx.store.revoke_lease(lease_id)

    async def assignments(self, node: str) -> AsyncIterator[dict[str, Assignment]]:
        prefix = keys.assign_prefix(node)
        store = self.ctx.store
        while True:
            try:
                items, revision = await store.list_all(prefix)
                current: dict[str, Assignment] = {}
                for kv in items:
                    self._apply(current, kv)
                yield dict(current)
                async for event in store.watch(prefix, revision):
                    vm = keys.name_from_key(event.kv.key)
                    if event.type == "delete":
                        current.pop(vm, None)
                    else:
                        self._apply(current, event.kv)
                    yield dict(current)
            except Compacted:
                continue
            except CorralError as exc:
                log.warning("assignment watch for %s failed (%s); re-listing", node, exc)
                await asyncio.sleep(1.0)

    @staticmethod
    def _apply(current: dict[str, Assignment], kv: KV) -> None:
        """Decode one changed assignment into ``current`` (only the changed key is decoded)."""
        try:
            a = decode("assignment", kv.value, Assignment)
        except CodecError as exc:
            log.error("unreadable assignment %s: %s", kv.key, exc)
            current.pop(keys.name_from_key(kv.key), None)
            return
        current[a.vm] = a

    async def _migration_report(self, node: str, obs: VmObservation) -> bool:
        """Record a host's side of a live migration in the migration record; True when the
        observation must not touch the VM's status (the migration owns it until it ends)."""
        report = obs.migration
        assert report is not None

        def record(m: Migration) -> Migration | None:
            if m.spec.vm_id != obs.vm_id or m.id != report.id:
                return None
            host = m.spec.source if report.role == "source" else m.spec.target
            if host != node:
                return None
            st = m.status
            if (st.source if report.role == "source" else st.target) == report:
                return None
            if report.role == "source":
                st.source = report
            else:
                st.target = report
            return m

        try:
            await self.ctx.objects.update(Migration, obs.vm, record)
        except NotFound:
            return False
        # A source that cancelled (or failed) runs the guest again: its report is the truth.
        return not (report.role == "source" and report.status in ("cancelled", "failed"))

    async def report(self, node: str, observations: list[VmObservation]) -> None:
        """Record observations; those of different VMs at once (their reads and writes then
        share etcd round trips), those of one VM in order."""
        by_vm: dict[str, list[VmObservation]] = {}
        for obs in observations:
            by_vm.setdefault(obs.vm, []).append(obs)

        async def in_order(group: list[VmObservation]) -> None:
            for obs in group:
                await self._report_one(node, obs)

        results = await asyncio.gather(
            *(in_order(g) for g in by_vm.values()), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _report_one(self, node: str, obs: VmObservation) -> None:
        if obs.migration is not None and await self._migration_report(node, obs):
            return

        placed_here: list[bool] = []

        def observe(
            vm: Vm, obs: VmObservation = obs, placed_here: list[bool] = placed_here
        ) -> Vm | None:
            placed_here[:] = [vm.id == obs.vm_id and vm.status.node == node]
            if vm.id != obs.vm_id or vm.status.node != node or obs.epoch < vm.status.epoch:
                return None  # a stale report about an older placement
            st = vm.status
            state = "deleting" if vm.deleting else obs.state
            new = (
                state,
                obs.observed_generation,
                obs.started_at,
                obs.message,
                obs.runtime,
                obs.epoch,
            )
            have = (
                st.state,
                st.observed_generation,
                st.started_at,
                st.message,
                st.runtime,
                st.observed_epoch,
            )
            if have == new:
                return None
            st.observed_epoch = obs.epoch
            st.state = state
            st.observed_generation = max(st.observed_generation, obs.observed_generation)
            st.started_at = obs.started_at
            st.message = obs.message
            st.runtime = dict(obs.runtime)
            return vm

        try:
            await self.ctx.objects.update(Vm, obs.vm, observe)
        except NotFound:
            log.info("report about vm %s, which no longer exists", obs.vm)
            return
        if not all(placed_here):
            return  # e.g. the source of a finished migration: its files are not the VM's
        for volume, path in obs.volumes.items():
            await self._volume_made(node, volume, path)

    async def _volume_made(self, node: str, name: str, path: str) -> None:
        """Record that the volume's file exists on ``node`` (once: later reports change
        nothing)."""

        def made(volume: Volume) -> Volume | None:
            st = volume.status
            if st.state == "ready" and st.path == path:
                return None
            if path.rsplit("/", 1)[-1] != volume.file_name:
                return None  # a report from before a linked clone moved it onto a new file
            if st.state not in ("pending", "creating", "ready"):
                return None
            st.state, st.node, st.path, st.message = "ready", node, path, ""
            return volume

        try:
            await self.ctx.objects.update(Volume, name, made)
        except NotFound:
            log.info("report about volume %s, which no longer exists", name)

    async def report_gone(self, node: str, vm: str, vm_id: str, epoch: int) -> None:
        current = await self.ctx.objects.find(Vm, vm)
        if current is None or current.id != vm_id or current.status.node != node:
            return
        if not current.deleting:
            return
        try:
            await self.ctx.store.commit(
                [Objects.delete(Vm, vm)], [Objects.expect_unchanged(current)]
            )
        except Conflict:
            await self.report_gone(node, vm, vm_id, epoch)
