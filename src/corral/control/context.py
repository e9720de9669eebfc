"""What every leader loop shares: the cache, the fence and a fenced commit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from corral.control.informer import Informer
from corral.model import Assignment, Node, Task, Vm
from corral.model.common import ObjectMeta
from corral.state import KV, Delete, Expect, Objects, Put, Store, keys
from corral.state.codec import decode

__all__ = ["ControlSettings", "LeaderContext"]

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


@dataclass
class LeaderContext:
    store: Store
    informer: Informer
    term: int
    settings: ControlSettings

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
        return rev

    def _get(self, model: type[ObjT], name: str) -> ObjT | None:
        kv = self.informer.get(Objects.key(model, name))
        return None if kv is None else Objects.decode(model, kv)

    def vm(self, name: str) -> Vm | None:
        return self._get(Vm, name)

    def node(self, name: str) -> Node | None:
        return self._get(Node, name)

    def task(self, name: str) -> Task | None:
        return self._get(Task, name)

    def all(self, model: type[ObjT]) -> list[ObjT]:
        prefix = keys.kind_prefix({Vm: "vms", Node: "nodes", Task: "tasks"}[model])
        return [Objects.decode(model, kv) for kv in self.informer.under(prefix)]

    def assignment(self, node: str, vm: str) -> tuple[Assignment, KV] | None:
        kv = self.informer.get(keys.assign_key(node, vm))
        if kv is None:
            return None
        return decode("assignment", kv.value, Assignment), kv

    def has_liveness(self, node: str) -> bool:
        return self.informer.get(keys.liveness_key(node)) is not None
