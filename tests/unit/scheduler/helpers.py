"""Small builders for scheduler tests: hosts and placed VMs with usage that adds up."""

from __future__ import annotations

from typing import Any

from corral.scheduler import Group, NodeView, PlacedVm, PoolView, Request, Snapshot

GIB = 1024**3
# One group of each policy (and a second anti-affinity one allowing 2 per host), for the
# randomized tests.
GROUPS = {
    "anti": Group("anti", "anti-affinity", max_per_node=1),
    "anti2": Group("anti2", "anti-affinity", max_per_node=2),
    "aff": Group("aff", "affinity"),
    "soft": Group("soft", "soft-anti-affinity", weight=0.5),
    "pull": Group("pull", "soft-affinity", weight=0.5),
}


def node(name: str, **kw: Any) -> NodeView:
    base: dict[str, Any] = {
        "state": "ready",
        "roles": ("compute",),
        "cpus": 8,
        "memory_mib": 16384,
        "accelerators": frozenset({"kvm", "tcg"}),
        "qemu_version": (8, 2, 0),
        "machine_types": frozenset({"q35", "pc-q35-8.2"}),
    }
    base.update(kw)
    return NodeView(name=name, **base)


def cluster(
    nodes: list[NodeView],
    vms: list[PlacedVm] = (),  # type: ignore[assignment]
    groups: list[Group] = (),  # type: ignore[assignment]
    **kw: Any,
) -> Snapshot:
    """A snapshot whose hosts' usage includes the listed VMs (added to what the hosts say)."""
    add: dict[str, list[int]] = {}
    pool_add: dict[tuple[str, str], int] = {}
    shared = kw.get("shared_pools", {})
    for vm in vms:
        a = add.setdefault(vm.node, [0, 0, 0])
        a[0] += vm.request.vcpus
        a[1] += vm.request.memory_mib
        a[2] += 1
        for pool, size in vm.request.disks.items():
            if pool not in shared:
                pool_add[vm.node, pool] = pool_add.get((vm.node, pool), 0) + size
    out = []
    for n in nodes:
        a = add.get(n.name, [0, 0, 0])
        pools = {
            p: PoolView(v.capacity_bytes, v.used_bytes + pool_add.get((n.name, p), 0))
            for p, v in n.pools.items()
        }
        out.append(
            NodeView(
                **{
                    **n.__dict__,
                    "used_vcpus": n.used_vcpus + a[0],
                    "used_memory_mib": n.used_memory_mib + a[1],
                    "vms": n.vms + a[2],
                    "pools": pools,
                }
            )
        )
    return Snapshot(tuple(out), vms=tuple(vms), groups={g.name: g for g in groups}, **kw)


def vm(name: str, on: str, vcpus: int = 1, memory_mib: int = 1024, **kw: Any) -> PlacedVm:
    return PlacedVm(on, Request(name, vcpus, memory_mib, **kw))
