"""What every leader loop shares: the cache, the fence and a fenced commit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from corral.control.informer import Informer
from corral.model import Assignment, Group, Image, Migration, Node, Pool, Task, Vm, Volume
from corral.model.common import ObjectMeta
from corral.scheduler import PlacedVm
from corral.state import KV, Delete, Expect, Objects, Put, Store, keys
from corral.state.codec import decode
from corral.state.objects import kind_of

__all__ = ["ControlSettings", "LeaderContext"]

_VMS = keys.kind_prefix("vms")

ObjT = TypeVar("ObjT", bound=ObjectMeta)


@dataclass(frozen=True)
class ControlSettings:
    cpu_allocation_ratio: float = 4.0
    memory_allocation_ratio: float = 1.0
    # A node whose liveness lease is gone this long is "down" rather than "not-ready".
    node_down_after_s: float = 60.0
    # Tasks that have not ended by then fail with "timed out".
    task_timeout_s: float = 600.0
    resync_s: float = 10.0
    # False when the user runs etcd (--etcd-endpoints): corral then never changes its members.
    manage_etcd: bool = True


@dataclass
class LeaderContext:
    store: Store
    informer: Informer
    term: int
    settings: ControlSettings
    _cache: dict[str, tuple[int, ObjectMeta]] = field(default_factory=dict)
    _assignments: dict[str, tuple[int, Assignment]] = field(default_factory=dict)
    # What each placed VM takes, and the sums per node: kept up to date key by key so that a
    # placement does not walk every VM of the cluster.
    _taken: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    _used: dict[str, list[int]] = field(default_factory=dict)
    # node -> vm -> (vCPUs, MiB): what the allocation records should say.
    _placed: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    # Placement's view of each placed VM without disks or group: name -> (mod_revision,
    # PlacedVm), so a placement pass does not rebuild every VM's request.
    placed_requests: dict[str, tuple[int, PlacedVm]] = field(default_factory=dict)

    @property
    def fence(self) -> Expect:
        return Expect(keys.LEADER, create_revision=self.term)

    async def commit(self, ops: Sequence[Put | Delete], expect: Sequence[Expect] = ()) -> int:
        """Commit fenced by leadership, then apply the writes to the cache."""
        rev = await self.store.commit(ops, [self.fence, *expect])
        for op in ops:
            if isinstance(op, Put):
                self.informer.apply(KV(op.key, op.value, rev, rev, 1, op.lease))
            else:
                self.informer.apply_delete(op.key)
            if op.key.startswith(_VMS):
                self.track(op.key)
        return rev

    def forget(self, key: str) -> None:
        """Drop the decoded copy of a key that is gone."""
        self._cache.pop(key, None)
        self._assignments.pop(key, None)

    def track(self, key: str) -> bool:
        """Update the per-node usage after the VM at ``key`` changed (or went); whether what
        it takes where (host, vCPUs, MiB) changed."""
        old = self._taken.pop(key, None)
        if old is not None:
            used = self._used[old[0]]
            used[0] -= old[1]
            used[1] -= old[2]
            used[2] -= 1
            self._placed.get(old[0], {}).pop(keys.name_from_key(key), None)
        kv = self.informer.get(key)
        if kv is None:
            return old is not None
        vm = self._decoded(Vm, kv)
        if vm.status.node:
            self._taken[key] = (vm.status.node, vm.spec.vcpus, vm.spec.memory_mib)
            used = self._used.setdefault(vm.status.node, [0, 0, 0])
            used[0] += vm.spec.vcpus
            used[1] += vm.spec.memory_mib
            used[2] += 1
            self._placed.setdefault(vm.status.node, {})[vm.name] = (
                vm.spec.vcpus,
                vm.spec.memory_mib,
            )
        return self._taken.get(key) != old

    def node_of(self, key: str) -> str | None:
        """The node the VM at ``key`` was placed on, as last tracked."""
        taken = self._taken.get(key)
        return taken[0] if taken else None

    def placed_hosts(self) -> list[str]:
        """Hosts with at least one VM record placed on them, as last tracked."""
        return [node for node, vms in self._placed.items() if vms]

    def placed_on(self, node: str) -> dict[str, tuple[int, int]]:
        """VM -> (vCPUs, MiB) for every VM record placed on ``node`` (read-only)."""
        return self._placed.get(node, {})

    def used(self, node: str) -> tuple[int, int, int]:
        """vCPUs, MiB and VM count placed on ``node`` (deleting VMs hold them until gone)."""
        u = self._used.get(node, [0, 0, 0])
        return u[0], u[1], u[2]

    def _decoded(self, model: type[ObjT], kv: KV) -> ObjT:
        """The object in ``kv``, decoded once per revision (shared: callers must not mutate)."""
        hit = self._cache.get(kv.key)
        if hit is not None and hit[0] == kv.mod_revision:
            return hit[1]  # type: ignore[return-value]
        obj = Objects.decode(model, kv)
        self._cache[kv.key] = (kv.mod_revision, obj)
        return obj

    def _get(self, model: type[ObjT], name: str) -> ObjT | None:
        """A private copy of one object, free to change and commit."""
        shared = self.peek(model, name)
        return None if shared is None else shared.model_copy(deep=True)

    def peek(self, model: type[ObjT], name: str) -> ObjT | None:
        """One object as cached, read-only (shared: never change it; copy it to commit)."""
        kv = self.informer.get(Objects.key(model, name))
        return None if kv is None else self._decoded(model, kv)

    def vm(self, name: str) -> Vm | None:
        return self._get(Vm, name)

    def node(self, name: str) -> Node | None:
        return self._get(Node, name)

    def task(self, name: str) -> Task | None:
        return self._get(Task, name)

    def pool(self, name: str) -> Pool | None:
        return self._get(Pool, name)

    def volume(self, name: str) -> Volume | None:
        return self._get(Volume, name)

    def image(self, name: str) -> Image | None:
        return self._get(Image, name)

    def migration(self, vm: str) -> Migration | None:
        return self._get(Migration, vm)

    def group(self, name: str) -> Group | None:
        return self._get(Group, name)

    def all(self, model: type[ObjT]) -> list[ObjT]:
        """Every object of a kind, read-only (shared with the cache)."""
        prefix = keys.kind_prefix(kind_of(model)[0])
        return [self._decoded(model, kv) for kv in self.informer.under(prefix)]

    def assignment(self, node: str, vm: str) -> tuple[Assignment, KV] | None:
        """The assignment as cached, decoded once per revision (read-only: copy to change)."""
        kv = self.informer.get(keys.assign_key(node, vm))
        if kv is None:
            return None
        hit = self._assignments.get(kv.key)
        if hit is not None and hit[0] == kv.mod_revision:
            return hit[1], kv
        decoded = decode("assignment", kv.value, Assignment)
        self._assignments[kv.key] = (kv.mod_revision, decoded)
        return decoded, kv

    def has_liveness(self, node: str) -> bool:
        return self.informer.get(keys.liveness_key(node)) is not None
