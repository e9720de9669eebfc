"""Node and cluster reads."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, get_args

from corral import __version__
from corral.cluster import pki, read_leader
from corral.errors import Conflict, CorralError, NotFound, ValidationFailed
from corral.model import Allocated, ClusterConfig, ClusterInfo, Node, Vm, rfc3339
from corral.model.common import labels_match, merge_patch, parse_label_selector
from corral.model.node import NodeState
from corral.model.pki import ClusterPki
from corral.service.context import ServiceContext
from corral.service.validate import parse
from corral.state import Expect, Put, keys
from corral.state.codec import decode, encode

__all__ = ["ClusterService", "NodeService"]


@dataclass(frozen=True)
class NodeList:
    items: list[Node]
    revision: int


def _with_allocation(nodes: list[Node], vms: list[Vm]) -> list[Node]:
    alloc: dict[str, Allocated] = {}
    for vm in vms:
        if vm.status.node:
            a = alloc.setdefault(vm.status.node, Allocated())
            a.vcpus += vm.spec.vcpus
            a.memory_mib += vm.spec.memory_mib
            a.vms += 1
    for node in nodes:
        node.status.allocated = alloc.get(node.name, Allocated())
    return nodes


class NodeService:
    """Reads of node records, with what their VMs take filled in; removal and leave."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def leave(self, name: str) -> Node:
        """Mark a host as gone for good (its agent is shutting down with --leave).

        Its etcd member is removed by the leader's membership loop; it holds no VMs.
        """
        return await self._retire(name, require_down=False)

    async def remove(self, name: str) -> Node:
        """Remove a host that is no longer running (``corral node remove``)."""
        return await self._retire(name, require_down=True)

    async def _retire(self, name: str, *, require_down: bool) -> Node:
        vms, _ = await self.ctx.objects.all(Vm)
        placed = sorted(v.name for v in vms if v.status.node == name)
        if placed:
            shown = ", ".join(placed[:10]) + (" ..." if len(placed) > 10 else "")
            raise Conflict(
                f"node {name!r} still holds {len(placed)} VMs ({shown}); delete or move them first"
            )

        def retire(node: Node) -> Node | None:
            if require_down and node.status.state == "ready":
                raise Conflict(
                    f"node {name!r} is ready (its agent is running); stop it with "
                    "`corral agent --leave` on that host, or stop the agent first"
                )
            if node.status.state == "left":
                return None
            node.status.state = "left"
            node.status.message = "left the cluster"
            return node

        updated = await self.ctx.objects.update(Node, name, retire)
        return updated or await self.ctx.objects.get(Node, name)

    async def list(
        self, *, label: str | None = None, state: str | None = None, stale: bool = False
    ) -> NodeList:
        try:
            terms = parse_label_selector(label) if label else []
        except ValueError as exc:
            raise ValidationFailed.one("label", "selector", str(exc)) from None
        states = get_args(NodeState)
        if state and state not in states:
            raise ValidationFailed.one("state", "one-of", f"must be one of {', '.join(states)}")
        nodes, revision = await self.ctx.objects.all(Node, serializable=stale)
        nodes = [
            n
            for n in nodes
            if (not state or n.status.state == state) and labels_match(n.spec.labels, terms)
        ]
        vms, _ = await self.ctx.objects.all(Vm, serializable=True)
        return NodeList(_with_allocation(nodes, vms), revision)

    async def get(self, name: str, *, stale: bool = False) -> Node:
        node = await self.ctx.objects.get(Node, name, serializable=stale)
        vms, _ = await self.ctx.objects.all(Vm, serializable=True)
        return _with_allocation([node], vms)[0]


class ClusterService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def configure(self, patch: Any) -> ClusterConfig:
        """Merge-patch the cluster config (``desired_voters``, ``server_dead_grace_s``)."""
        if not isinstance(patch, dict):
            raise ValidationFailed.one("", "type", "the body must be a JSON merge patch object")
        new_config: ClusterConfig | None = None
        for _ in range(8):
            kv = await self.ctx.store.get(keys.CLUSTER)
            if kv is None:
                raise NotFound("this cluster has not been bootstrapped")
            info = decode("cluster", kv.value, ClusterInfo)
            merged = merge_patch(info.config.model_dump(), patch)
            new_config = parse(ClusterConfig, merged)
            info.config = new_config
            try:
                await self.ctx.store.commit(
                    [Put(keys.CLUSTER, encode("cluster", info))], [Expect.unchanged(kv)]
                )
            except Conflict:
                continue
            return new_config
        raise Conflict("the cluster record kept changing; try again")

    async def info(self) -> dict[str, Any]:
        store = self.ctx.store
        kv = await store.get(keys.CLUSTER)
        info = decode("cluster", kv.value, ClusterInfo) if kv else None
        status = await store.status()
        members = await store.members()
        leader = await read_leader(store)
        nodes, _ = await self.ctx.objects.all(Node)
        vms, _ = await self.ctx.objects.all(Vm)
        # Every member asked at once, so their raft indexes are from (nearly) one moment.
        answers = await asyncio.gather(
            *(
                store.member_status(m.client_urls[0])
                for m in members
                if m.client_urls  # a learner that has not started yet has none
            ),
            return_exceptions=True,
        )
        statuses = {
            a.member_id: a
            for a in answers
            if not isinstance(a, BaseException) and a.member_id in {m.id for m in members}
        }
        for a in answers:
            if isinstance(a, BaseException) and not isinstance(a, CorralError):
                raise a
        healthy = {m.id: m.id in statuses and statuses[m.id].leader_id != 0 for m in members}
        leader_status = statuses.get(status.leader_id)
        leader_index = leader_status.raft_index if leader_status else None

        def lag(member_id: int) -> int | None:
            mine = statuses.get(member_id)
            if mine is None or leader_index is None:
                return None
            return max(0, leader_index - mine.raft_index)

        pki_kv = await store.get(keys.PKI)
        return {
            "kind": "cluster",
            "id": info.id if info else None,
            "name": info.name if info else None,
            "created_at": rfc3339(info.created_at) if info else None,
            "version": __version__,
            "revision": status.revision,
            "etcd": {
                "version": status.version,
                "raft_term": status.raft_term,
                "raft_index": status.raft_index,
                "db_size_bytes": status.db_size,
            },
            "leader": (
                {
                    "node": leader[0].node,
                    "address": leader[0].address,
                    "term": leader[1],
                    "since": rfc3339(leader[0].since),
                }
                if leader
                else None
            ),
            "members": [
                {
                    "name": m.name,
                    "id": f"{m.id:x}",
                    "peer_urls": m.peer_urls,
                    "client_urls": m.client_urls,
                    "is_learner": m.is_learner,
                    "is_leader": m.id == status.leader_id,
                    "healthy": healthy[m.id],
                    "raft_index": statuses[m.id].raft_index if m.id in statuses else None,
                    # Raft entries the member is behind the leader (None: it did not answer).
                    "lag": lag(m.id),
                }
                for m in members
            ],
            "config": info.config.model_dump() if info else None,
            "ca_fingerprint": (
                pki.fingerprint(decode("pki", pki_kv.value, ClusterPki).ca_cert) if pki_kv else None
            ),
            "nodes": {
                "total": len(nodes),
                "ready": sum(1 for n in nodes if n.status.state == "ready"),
            },
            "vms": {
                "total": len(vms),
                "running": sum(1 for v in vms if v.status.state == "running"),
            },
        }
