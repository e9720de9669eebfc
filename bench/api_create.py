"""VM creates through the REST API of a real agent (fake driver): creates/s and p50/p99.

Measures ``POST /api/v1/vms`` (202 once the VM and its task are committed), sequentially and
with 32 in flight, then waits until the cluster has started every VM and reports that rate too.
Run: ``make bench`` or ``.venv/bin/python -m bench.api_create``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench._util import LeanHttp, free_port, summary


def start_agent(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(
        {
            "CORRAL_DRIVER": "fake",
            "CORRAL_FAKE_START_DELAY_S": "0",
            "CORRAL_CPU_ALLOCATION_RATIO": "1000",
            "CORRAL_MEMORY_ALLOCATION_RATIO": "100",
            "CORRAL_LOG_LEVEL": "warning",
        }
    )
    if os.environ.get("BENCH_PROFILE_DIR"):
        # cProfile the agent; <dir>/<name>.prof is written when it stops.
        env["CORRAL_PROFILE_DIR"] = os.environ["BENCH_PROFILE_DIR"]
    cmd = [
        sys.executable,
        "-m",
        "corral",
        "agent",
        "--bootstrap",
        "--name",
        "bench",
        "--data-dir",
        str(data_dir),
        "--http-port",
        str(port),
        "--etcd-client-port",
        str(free_port()),
        "--etcd-peer-port",
        str(free_port()),
    ]
    log = open(data_dir / "agent.log", "ab")  # noqa: SIM115 - lives as long as the agent
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"agent did not become ready; see {data_dir / 'agent.log'}")


async def create_batch(
    url: str, prefix: str, count: int, in_flight: int
) -> tuple[list[float], float]:
    """``count`` creates over ``in_flight`` keep-alive connections (see ``LeanHttp``)."""
    latencies: list[float] = []
    conns = [LeanHttp(url) for _ in range(in_flight)]
    todo = iter(range(count))

    async def worker(conn: LeanHttp) -> None:
        for i in todo:
            t0 = time.perf_counter()
            status, text = await conn.post(
                "/api/v1/vms", {"name": f"{prefix}-{i}", "memory_mib": 64}
            )
            latencies.append(time.perf_counter() - t0)
            if status != 202:
                raise SystemExit(f"create failed: {status} {text.decode()}")

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    return latencies, time.perf_counter() - start


def wait_running(url: str, total: int, started: float) -> float:
    with httpx.Client(base_url=url, timeout=30) as client:
        while True:
            items = client.get("/api/v1/vms", params={"limit": 1000, "state": "running"}).json()
            running = len(items["items"])
            cursor = items["next_cursor"]
            while cursor:
                page = client.get(
                    "/api/v1/vms", params={"limit": 1000, "state": "running", "cursor": cursor}
                ).json()
                running += len(page["items"])
                cursor = page["next_cursor"]
            if running >= total:
                return time.perf_counter() - started
            time.sleep(0.2)


async def main(sequential: int, concurrent: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_agent(Path(tmp))
        try:
            await create_batch(url, "warm", 20, 4)
            print(f"POST /api/v1/vms on {url} (fake driver, 64 MiB VMs)")
            t0 = time.perf_counter()
            lat, elapsed = await create_batch(url, "seq", sequential, 1)
            print(summary("create, sequential", lat, elapsed))
            lat, elapsed = await create_batch(url, "par", concurrent, 32)
            print(summary("create, 32 in flight", lat, elapsed))
            total = 20 + sequential + concurrent
            ready = wait_running(url, total, t0)
            print(
                f"{'all VMs running (placed + started)':<34} {total:>6} vms  "
                f"{total / ready:>8.0f}/s  in {ready:.1f} s"
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--concurrent", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(main(args.sequential, args.concurrent))
