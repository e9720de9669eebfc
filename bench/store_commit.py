"""store.commit against a real etcd member: transactions/s and p50/p99 latency.

Each transaction is what creating a VM writes: the VM record and its task, guarded by a
compare that the VM does not exist yet.
Run: ``make bench`` or ``.venv/bin/python -m bench.store_commit``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench._util import free_port, summary
from corral.cluster import EtcdConfig, EtcdSupervisor
from corral.state import Expect, Put, Store

VALUE = b'{"schema":"corral","kind":"vm","v":1,"data":{' + b'"x":' + b'"' + b"y" * 600 + b'"}}'


async def run_batch(
    store: Store, prefix: str, count: int, in_flight: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    sem = asyncio.Semaphore(in_flight)

    async def one(i: int) -> None:
        key = f"/corral/v1/vms/{prefix}-{i}"
        async with sem:
            t0 = time.perf_counter()
            await store.commit(
                [Put(key, VALUE), Put(f"/corral/v1/tasks/{prefix}-{i}", VALUE)],
                [Expect.missing(key)],
            )
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return latencies, time.perf_counter() - start


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        etcd = EtcdSupervisor(EtcdConfig("bench", Path(tmp), "127.0.0.1", free_port(), free_port()))
        await etcd.start()
        store = Store([etcd.config.client_url])
        try:
            await run_batch(store, "warm", 50, 8)
            print(f"store.commit on etcd at {etcd.config.client_url} (2 puts + 1 compare each)")
            for in_flight in (1, 16, 64):
                lat, elapsed = await run_batch(store, f"b{in_flight}", count, in_flight)
                print(summary(f"store.commit, {in_flight} in flight", lat, elapsed))
        finally:
            await store.close()
            await etcd.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="transactions per run")
    asyncio.run(main(parser.parse_args().count))
