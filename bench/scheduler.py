"""The pure scheduler: placements/s and p50/p99 per placement at 100, 1,000 and 10,000 hosts.

Each simulated cluster already runs 10 VMs per host (some in anti-affinity and soft groups,
hosts labelled with zone and rack, a local pool per host and a shared pool). One
``Scheduler`` is built per cluster (its build time is printed), then VMs are placed one after
the other, each plan applied before the next: half plain requests under the cluster's default
``spread`` policy, the other half a mix of node selector, anti-affinity group, zone spread,
disks, KVM, priority and a ``binpack``/``balanced`` override. Also prints the rebalancer's
planning time and score for the 1,000-host cluster. Target: >= 1,000 placements/s at 1,000 hosts.
Run: ``make bench`` or ``.venv/bin/python -m bench.scheduler``.
"""

from __future__ import annotations

import argparse
import random
import time

from bench._util import summary
from corral.scheduler import (
    Group,
    NodeView,
    PlacedVm,
    PoolView,
    Request,
    Scheduler,
    Snapshot,
)
from corral.scheduler.rebalance import imbalance, plan_moves

GIB = 1024**3
ZONES = ("a", "b", "c")


def cluster(hosts: int, vms_per_host: int, rng: random.Random) -> Snapshot:
    """``hosts`` hosts with ``vms_per_host`` VMs each, usage figures matching the VMs."""
    groups = {
        "db": Group("db", "anti-affinity", max_per_node=3),
        "web": Group("web", "soft-anti-affinity", weight=0.5),
        "cache": Group("cache", "soft-affinity", weight=0.3),
    }
    vms: list[PlacedVm] = []
    nodes: list[NodeView] = []
    for h in range(hosts):
        name = f"hv-{h:05d}"
        used_c = used_m = used_d = 0
        for v in range(vms_per_host):
            group = rng.choice((None, None, "web", "cache", "db"))
            if group == "db" and v >= 2:
                group = None
            req = Request(
                vm=f"{name}-vm{v}",
                vcpus=rng.choice((1, 2, 4)),
                memory_mib=rng.choice((1024, 2048, 4096, 8192)),
                disks={"local": 20 * GIB} if v % 2 else {"ceph": 20 * GIB},
                group=group,
                priority=rng.choice((0, 0, 0, 1, 2)),
            )
            used_c += req.vcpus
            used_m += req.memory_mib
            used_d += req.disks.get("local", 0)
            vms.append(PlacedVm(name, req))
        nodes.append(
            NodeView(
                name=name,
                state="ready" if h % 50 else "not-ready",
                roles=("compute",),
                cpus=64,
                memory_mib=512 * 1024,
                used_vcpus=used_c,
                used_memory_mib=used_m,
                vms=vms_per_host,
                labels={
                    "zone": ZONES[h % 3],
                    "rack": f"r{h // 20}",
                    "ssd": "yes" if h % 4 else "no",
                },
                reserved_vcpus=2,
                reserved_memory_mib=8192,
                cordoned=h % 97 == 0,
                pools={"local": PoolView(4096 * GIB, used_d)},
                accelerators=frozenset({"kvm", "tcg"} if h % 10 else {"tcg"}),
                qemu_version=(8, 2, 0),
                machine_types=frozenset({"pc-q35-8.2", "q35"}),
            )
        )
    shared = {"ceph": PoolView(10**6 * GIB, hosts * vms_per_host * 10 * GIB)}
    return Snapshot(
        tuple(nodes), cpu_allocation_ratio=4.0, vms=tuple(vms), groups=groups, shared_pools=shared
    )


def requests(count: int, rng: random.Random) -> list[Request]:
    out = []
    for k in range(count):
        name = f"new-{k}"
        size = {"vcpus": rng.choice((1, 2)), "memory_mib": rng.choice((512, 1024, 2048))}
        kind = k % 8
        if kind < 4:
            out.append(Request(name, **size))
        elif kind == 4:
            out.append(Request(name, **size, node_selector={"ssd": "yes"}, requires_kvm=True))
        elif kind == 5:
            out.append(Request(name, **size, group="db", spread_over="zone"))
        elif kind == 6:
            out.append(Request(name, **size, disks={"local": 10 * GIB}, policy="binpack"))
        else:
            out.append(Request(name, **size, group="web", priority=2, policy="balanced"))
    return out


def run(hosts: int, placements: int, vms_per_host: int, seed: int) -> None:
    rng = random.Random(seed)
    snap = cluster(hosts, vms_per_host, rng)
    reqs = requests(placements, rng)
    t0 = time.perf_counter()
    sched = Scheduler(snap)
    build = time.perf_counter() - t0
    latencies: list[float] = []
    unplaced = 0
    start = time.perf_counter()
    for req in reqs:
        t = time.perf_counter()
        plan = sched.schedule(req)
        if plan.node is None:
            unplaced += 1
        else:
            sched.place(req, plan.node)
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    label = f"place, {hosts} hosts ({hosts * vms_per_host} vms)"
    print(summary(label, latencies, elapsed) + f"  index {build * 1000:.0f} ms", end="")
    print(f"  ({unplaced} unplaceable)" if unplaced else "")


def rebalance(hosts: int, vms_per_host: int, seed: int) -> None:
    snap = cluster(hosts, vms_per_host, random.Random(seed))
    t0 = time.perf_counter()
    before = imbalance(snap)
    moves = plan_moves(snap, min_gain=0.0001, max_moves=8)
    elapsed = time.perf_counter() - t0
    after = moves[-1].score_after if moves else before
    print(
        f"{f'rebalance plan, {hosts} hosts':<34} {len(moves):>6} moves {elapsed:>8.2f} s  "
        f"imbalance {before:.4f} -> {after:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--placements", type=int, default=2000)
    parser.add_argument("--vms-per-host", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print("pure scheduler, one placement after another (each applied before the next)")
    for hosts, count in ((100, args.placements), (1000, args.placements), (10000, 300)):
        run(hosts, count, args.vms_per_host, args.seed)
    rebalance(1000, args.vms_per_host, args.seed)


if __name__ == "__main__":
    main()
