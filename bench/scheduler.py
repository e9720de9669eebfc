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
driver, VMs start at once) on 127.0.0.1-3, ``--e2e-vms`` creates POSTed over 64 keep-alive
connections, a third per API, each taking the next VM as soon as its last was accepted, timed
from the first POST until every VM has a node (placed) and until every VM runs, as a watch on
one etcd member sees it (no API listing competes with the cluster for CPU). Also printed: etcd
write transactions per VM (group commit at work), and a queued burst (VMs created while every
host is cordoned, placed once all are uncordoned). Target: >= 200 placements/s.
``BENCH_PROFILE_DIR=dir`` cProfiles each agent (``dir/s1.prof`` ...; read with pstats);
``BENCH_DIR=dir`` keeps the agents' data and logs, ``BENCH_LOG_LEVEL=info`` makes them talk.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench._util import LeanHttp, free_port, summary
from corral.daemon.identity import HostPki
from corral.errors import Unavailable
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
from corral.state import keys
from corral.state.store import Store

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


def _agent(
    data: Path, name: str, ip: str, join: list[str]
) -> tuple[subprocess.Popen[bytes], str, str]:
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
                return proc, url, f"https://{ip}:{ports[0]}"
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"agent {name} did not become ready; see {data / name}.log")


class Progress:
    """Counts VMs placed and running from a watch on one server's etcd member (with that
    host's etcd certificate), so measuring costs the cluster one watch, not a listing of
    every VM through the API every few milliseconds."""

    def __init__(self, data: Path, name: str, endpoints: list[str]) -> None:
        self.store = Store(endpoints, tls=HostPki(data / name).etcd_tls())
        self.vms: dict[str, tuple[bool, bool]] = {}
        self.placed = self.running = 0
        # Keys written (puts) per kind of record, e.g. "vms", "tasks", "assignments".
        self.writes: collections.Counter[str] = collections.Counter()
        self._task: asyncio.Task[None] | None = None

    def _see(self, key: str, value: bytes | None) -> None:
        old = self.vms.pop(key, (False, False))
        new = (False, False)
        if value is not None:
            status = json.loads(value)["data"]["status"]
            new = (status["node"] is not None, status["state"] == "running")
            self.vms[key] = new
        self.placed += new[0] - old[0]
        self.running += new[1] - old[1]

    async def start(self) -> None:
        vms = keys.kind_prefix("vms")
        prefix = keys.PREFIX
        for _ in range(100):
            try:
                items, rev = await self.store.list_all(vms)
                break
            except Unavailable:  # a member still a learner: the store tries the next one
                await asyncio.sleep(0.3)
        else:
            raise SystemExit("no etcd member answered the progress watch")
        for kv in items:
            self._see(kv.key, kv.value)

        async def follow() -> None:
            async for ev in self.store.watch(prefix, rev):
                key = ev.kv.key
                if ev.type == "put":
                    self.writes[key[len(prefix) :].split("/", 1)[0]] += 1
                if key.startswith(vms):
                    self._see(key, ev.kv.value if ev.type == "put" else None)

        self._task = asyncio.create_task(follow())

    async def until(self, placed: int, running: int = 0) -> float:
        """Wait until that many VMs are placed (and running); the perf_counter then."""
        while self.placed < placed or self.running < running:
            if self._task is not None and self._task.done():
                self._task.result()
            await asyncio.sleep(0.005)
        return time.perf_counter()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.store.close()


async def _create(urls: list[str], count: int, in_flight: int, prefix: str = "e2e") -> list[float]:
    """POST ``count`` VMs over ``in_flight`` connections spread evenly over the servers, each
    taking the next VM when its previous one was accepted (a slower server, such as the
    leader, gets fewer, as behind a least-outstanding-requests balancer)."""
    latencies: list[float] = []
    per_server = max(in_flight // len(urls), 1)
    conns = [LeanHttp(u) for u in urls for _ in range(per_server)]
    todo = iter(range(count))
    pid = os.getpid()

    async def worker(conn: LeanHttp) -> None:
        for i in todo:
            t0 = time.perf_counter()
            # A retried POST (dropped connection) carries the same key: it is safe.
            status, text = await conn.post(
                "/api/v1/vms",
                {"name": f"{prefix}-{i}", "memory_mib": 64},
                {"Idempotency-Key": f"{prefix}-{i}-{pid}"},
            )
            latencies.append(time.perf_counter() - t0)
            if status not in (200, 202):
                raise SystemExit(f"create {prefix}-{i} failed: {status} {text.decode()}")

    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    return latencies


def e2e(count: int, in_flight: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(os.environ.get("BENCH_DIR") or tmp)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            p1, u1, e1 = _agent(data, "s1", "127.0.0.1", [])
            procs.append(p1)
            r = httpx.post(u1 + "/api/v1/tokens", json={"uses": 5}, timeout=10)
            secret = r.json()["secret"]
            urls = [u1]
            etcd = [e1]
            for name, ip in (("s2", "127.0.0.2"), ("s3", "127.0.0.3")):
                p, u, e = _agent(data, name, ip, ["--join", urls[-1], "--token", secret])
                etcd.insert(0, e)
                procs.append(p)
                urls.append(u)
            while True:
                items = httpx.get(u1 + "/api/v1/nodes", timeout=10).json()["items"]
                if sum(n["status"]["state"] == "ready" for n in items) == 3:
                    break
                time.sleep(0.2)
            print(f"end to end, 3 servers ({', '.join(urls)}), fake driver, {in_flight} in flight")
            asyncio.run(_measure(urls, data, etcd, count, in_flight))
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()


async def _measure(
    urls: list[str], data: Path, etcd: list[str], count: int, in_flight: int
) -> None:
    # Progress is watched on s3's etcd member (s1, which bootstrapped, most likely leads).
    progress = Progress(data, "s3", etcd)
    await progress.start()
    try:
        rev0 = await progress.store.revision()
        start = time.perf_counter()
        creating = asyncio.create_task(_create(urls, count, in_flight))
        placed = asyncio.create_task(progress.until(count))
        running = asyncio.create_task(progress.until(count, count))
        lat = await creating
        posted = time.perf_counter() - start
        print(summary("POST /api/v1/vms (accepted)", lat, posted))
        placed_at = await placed - start
        running_at = await running - start
        print(
            f"{'placed (first POST -> last node)':<34} {count:>6} vms  "
            f"{count / placed_at:>8.0f}/s  in {placed_at:.2f} s"
        )
        print(
            f"{'running (first POST -> last run)':<34} {count:>6} vms  "
            f"{count / running_at:>8.0f}/s  in {running_at:.2f} s"
        )
        writes = await progress.store.revision() - rev0
        print(f"{'etcd write transactions per vm':<34} {writes / count:>6.2f}")
        per_kind = ", ".join(f"{k} {n / count:.2f}" for k, n in progress.writes.most_common())
        print(f"{'keys written per vm, by kind':<34} {per_kind}")
        # The leader alone: VMs queued while every host is cordoned, then released at once.
        async with httpx.AsyncClient(base_url=urls[0], timeout=10) as api:
            for n in ("s1", "s2", "s3"):
                (await api.post(f"/api/v1/nodes/{n}/cordon")).raise_for_status()
            await _create(urls, count, in_flight, prefix="q")
            start = time.perf_counter()
            # All three at once: one host uncordoned well before the others would get every VM.
            for r in await asyncio.gather(
                *(api.post(f"/api/v1/nodes/{n}/uncordon") for n in ("s1", "s2", "s3"))
            ):
                r.raise_for_status()
        took = await progress.until(2 * count) - start
        print(
            f"{'queued burst placed (uncordon)':<34} {count:>6} vms  "
            f"{count / took:>8.0f}/s  in {took:.2f} s"
        )
    finally:
        await progress.close()


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
