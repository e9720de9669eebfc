"""Node and cluster reads."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from corral import __version__
from corral.cluster import read_leader
from corral.errors import CorralError
from corral.model import Allocated, ClusterInfo, Node, Vm, rfc3339
from corral.service.context import ServiceContext
from corral.state import keys
from corral.state.codec import decode

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
    """Reads of node records, with what their VMs take filled in."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def list(self, *, stale: bool = False) -> NodeList:
        nodes, revision = await self.ctx.objects.all(Node, serializable=stale)
        vms, _ = await self.ctx.objects.all(Vm, serializable=True)
        return NodeList(_with_allocation(nodes, vms), revision)

    async def get(self, name: str, *, stale: bool = False) -> Node:
        node = await self.ctx.objects.get(Node, name, serializable=stale)
        vms, _ = await self.ctx.objects.all(Vm, serializable=True)
        return _with_allocation([node], vms)[0]


class ClusterService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def info(self) -> dict[str, Any]:
        store = self.ctx.store
        kv = await store.get(keys.CLUSTER)
        info = decode("cluster", kv.value, ClusterInfo) if kv else None
        status = await store.status()
        members = await store.members()
        leader = await read_leader(store)
        nodes, _ = await self.ctx.objects.all(Node)
        vms, _ = await self.ctx.objects.all(Vm)
        healthy: dict[int, bool] = {}
        for m in members:
            healthy[m.id] = False
            with contextlib.suppress(CorralError):
                healthy[m.id] = bool(m.client_urls) and await _member_healthy(m.client_urls[0])
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
                }
                for m in members
            ],
            "nodes": {
                "total": len(nodes),
                "ready": sum(1 for n in nodes if n.status.state == "ready"),
            },
            "vms": {
                "total": len(vms),
                "running": sum(1 for v in vms if v.status.state == "running"),
            },
        }


async def _member_healthy(client_url: str) -> bool:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            resp = await client.get(client_url.rstrip("/") + "/health")
        return resp.status_code == 200 and resp.json().get("health") == "true"
    except (httpx.HTTPError, ValueError):
        return False
