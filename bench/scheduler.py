"""The pure scheduler: placements/s and p50/p99 per placement at 100, 1,000 and 10,000 hosts.

Each simulated cluster already runs 10 VMs per host (some in anti-affinity and soft groups,
hosts labelled with zone and rack, a local pool per host and a shared pool). One
``Scheduler`` is built per cluster (its build time is printed), then VMs are placed one after
the other, each plan applied before the next: half plain requests under the cluster's default
``spread`` policy, the other half a mix of node selector, anti-affinity group, zone spread,
disks, KVM, priority and a ``binpack``/``balanced`` override. Also prints the rebalancer's
planning time and score for the 1,000-host cluster. Target: >= 1,000 placements/s at 1,000 hosts.
Run: ``make bench`` or ``.venv/bin/python -m bench.scheduler``.

``--e2e`` measures placements end to end instead: a 3-server cluster of real agents (fake
driver, VMs start at once) on 127.0.0.1-3, ``--e2e-vms`` creates POSTed by 64 workers, a third
per API, each taking the next VM as soon as its last was accepted, timed from the first POST
until every VM has a node (placed) and until every VM runs. Target: >= 200 placements/s.
``BENCH_PROFILE_DIR=dir`` cProfiles each agent (``dir/s1.prof`` ...; read with pstats).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench._util import free_port, summary
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


def _agent(data: Path, name: str, ip: str, join: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port(ip)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(
        {
            "CORRAL_DRIVER": "fake",
            "CORRAL_FAKE_START_DELAY_S": "0",
            "CORRAL_FAKE_STOP_DELAY_S": "0",
            "CORRAL_CPU_ALLOCATION_RATIO": "1000",
            "CORRAL_MEMORY_ALLOCATION_RATIO": "100",
            "CORRAL_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "warning"),
        }
    )
    if os.environ.get("BENCH_PROFILE_DIR"):
        # cProfile each agent; <dir>/<name>.prof is written when the agent stops.
        env["CORRAL_PROFILE_DIR"] = os.environ["BENCH_PROFILE_DIR"]
    ports = [str(free_port(ip)) for _ in range(5)]
    cmd = [
        sys.executable, "-m", "corral", "agent", "--name", name, "--bind", ip,
        "--data-dir", str(data / name), "--http-port", str(port),
        "--etcd-client-port", ports[0], "--etcd-peer-port", ports[1], "--grpc-port", ports[2],
        "--gossip-port", ports[3], "--gossip-rpc-port", str(free_port()),
        *(join or ["--bootstrap"]),
    ]  # fmt: skip
    (data / name).mkdir(parents=True)
    log = open(data / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the agent
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
    url = f"http://{ip}:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"agent {name} did not become ready; see {data / name}.log")


def _count(url: str) -> tuple[int, int, int]:
    """(vms, placed, running) over every page."""
    total = placed = running = 0
    cursor = None
    while True:
        params: dict[str, object] = {"limit": 1000, "stale": "true"}
        if cursor:
            params["cursor"] = cursor
        page = httpx.get(url + "/api/v1/vms", params=params, timeout=30).json()  # type: ignore[arg-type]
        for v in page["items"]:
            total += 1
            placed += v["status"]["node"] is not None
            running += v["status"]["state"] == "running"
        cursor = page["next_cursor"]
        if not cursor:
            return total, placed, running


async def _create(urls: list[str], count: int, in_flight: int, prefix: str = "e2e") -> list[float]:
    """POST ``count`` VMs with ``in_flight`` workers spread evenly over the servers, each
    taking the next VM when its previous one was accepted (a slower server, such as the
    leader, gets fewer, as behind a least-outstanding-requests balancer)."""
    latencies: list[float] = []
    per_server = max(in_flight // len(urls), 1)
    clients = [
        httpx.AsyncClient(base_url=u, timeout=60, limits=httpx.Limits(max_connections=per_server))
        for u in urls
    ]
    todo = iter(range(count))
    try:

        async def one(client: httpx.AsyncClient, i: int) -> None:
            t0 = time.perf_counter()
            key = {"Idempotency-Key": f"{prefix}-{i}-{os.getpid()}"}
            for attempt in range(3):
                try:
                    r = await client.post(
                        "/api/v1/vms",
                        json={"name": f"{prefix}-{i}", "memory_mib": 64},
                        headers=key,
                    )
                    break
                except httpx.TransportError as exc:
                    # A dropped keep-alive connection: the same key makes the retry safe.
                    if attempt == 2:
                        raise SystemExit(f"create {prefix}-{i} failed: {exc!r}") from exc
            latencies.append(time.perf_counter() - t0)
            if r.status_code not in (200, 202):
                raise SystemExit(f"create failed: {r.status_code} {r.text}")

        async def worker(client: httpx.AsyncClient) -> None:
            for i in todo:
                await one(client, i)

        await asyncio.gather(*(worker(c) for c in clients for _ in range(per_server)))
    finally:
        for c in clients:
            await c.aclose()
    return latencies


def e2e(count: int, in_flight: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(os.environ.get("BENCH_DIR") or tmp)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            p1, u1 = _agent(data, "s1", "127.0.0.1", [])
            procs.append(p1)
            r = httpx.post(u1 + "/api/v1/tokens", json={"uses": 5}, timeout=10)
            secret = r.json()["secret"]
            urls = [u1]
            for name, ip in (("s2", "127.0.0.2"), ("s3", "127.0.0.3")):
                p, u = _agent(data, name, ip, ["--join", urls[-1], "--token", secret])
                procs.append(p)
                urls.append(u)
            while True:
                items = httpx.get(u1 + "/api/v1/nodes", timeout=10).json()["items"]
                if sum(n["status"]["state"] == "ready" for n in items) == 3:
                    break
                time.sleep(0.2)
            print(f"end to end, 3 servers ({', '.join(urls)}), fake driver, {in_flight} in flight")
            start = time.perf_counter()
            lat = asyncio.run(_create(urls, count, in_flight))
            posted = time.perf_counter() - start
            print(summary("POST /api/v1/vms (accepted)", lat, posted))
            # Progress is polled from the last server (s1, which bootstrapped, most likely
            # leads): listing every VM costs CPU the leader needs on a small machine.
            watch = urls[-1]
            placed_at = running_at = None
            while running_at is None:
                _, placed, running = _count(watch)
                now = time.perf_counter() - start
                if placed_at is None and placed >= count:
                    placed_at = now
                if running >= count:
                    running_at = now
                time.sleep(0.1)
            assert placed_at is not None
            print(
                f"{'placed (first POST -> last node)':<34} {count:>6} vms  "
                f"{count / placed_at:>8.0f}/s  in {placed_at:.2f} s"
            )
            print(
                f"{'running (first POST -> last run)':<34} {count:>6} vms  "
                f"{count / running_at:>8.0f}/s  in {running_at:.2f} s"
            )
            # The leader alone: VMs queued while every host is cordoned, then released at once.
            for n in ("s1", "s2", "s3"):
                httpx.post(f"{u1}/api/v1/nodes/{n}/cordon", timeout=10).raise_for_status()
            asyncio.run(_create(urls, count, in_flight, prefix="q"))
            start = time.perf_counter()
            for n in ("s1", "s2", "s3"):
                httpx.post(f"{u1}/api/v1/nodes/{n}/uncordon", timeout=10).raise_for_status()
            while _count(watch)[1] < 2 * count:
                time.sleep(0.1)
            took = time.perf_counter() - start
            print(
                f"{'queued burst placed (uncordon)':<34} {count:>6} vms  "
                f"{count / took:>8.0f}/s  in {took:.2f} s"
            )
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--placements", type=int, default=2000)
    parser.add_argument("--vms-per-host", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--e2e", action="store_true", help="placements through the API instead")
    parser.add_argument("--e2e-vms", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=64)
    args = parser.parse_args()
    if args.e2e:
        e2e(args.e2e_vms, args.in_flight)
        return
    print("pure scheduler, one placement after another (each applied before the next)")
    for hosts, count in ((100, args.placements), (1000, args.placements), (10000, 300)):
        run(hosts, count, args.vms_per_host, args.seed)
    rebalance(1000, args.vms_per_host, args.seed)


if __name__ == "__main__":
    main()
