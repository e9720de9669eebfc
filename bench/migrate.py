"""Live migration under TCG: total time, QEMU's downtime and the console gap seen from outside.

Two ``QemuDriver`` state directories stand for two hosts (source on 127.0.0.1, target on
127.0.0.2); the same ``QemuMigrator`` code the agents run moves a 256 MiB guest between them,
``--runs`` times (default 5) for an idle guest and for a guest dirtying memory (the test guest's
``dirty-memory 64`` rewrites 64 MiB of RAM with random bytes in a loop). The console gap is
the longest time between two heartbeat lines (printed every second) as read from the two
console logs, minus the one-second period.

    .venv/bin/python -m bench.migrate [--runs 5]   (or `make bench`)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from pathlib import Path

from corral.agent.drivers.base import DriverVm
from corral.agent.drivers.qemu import QemuDriver, load_guest_image
from corral.agent.drivers.qemu.migration import QemuMigrator
from corral.model import VmSpec
from corral.model.migration import IncomingMigration, OutgoingMigration

REPO = Path(__file__).resolve().parent.parent


async def _follow(paths: list[Path], stamps: list[float], stop: asyncio.Event) -> None:
    seen = [0, 0]
    while not stop.is_set():
        for i, path in enumerate(paths):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            count = text.count("corral-heartbeat")
            if count > seen[i]:
                stamps.extend([time.monotonic()] * (count - seen[i]))
                seen[i] = count
        await asyncio.sleep(0.01)


async def one_run(run: int, dirty: bool, base: Path) -> tuple[float, int, float]:
    image = load_guest_image(REPO / ".cache" / "guest" / "tiny.json")
    src = QemuDriver(base / f"s{run}", accel="tcg", boot=image.boot, vga=False)
    dst = QemuDriver(base / f"t{run}", accel="tcg", boot=image.boot, vga=False)
    name = "bench"
    disk = base / f"disk{run}.qcow2"
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1G"
    )
    await proc.wait()
    vm = DriverVm(name=name, vm_id="b", epoch=1, spec=VmSpec(memory_mib=256), state="stopped")
    from corral.agent.drivers.base import DriverDisk

    vm.disks = (DriverDisk(id="shared", path=str(disk)),)
    await src.define(vm)
    await dst.define(vm)
    await src.start(name)
    log_src = src.console_log_path(name)
    for _ in range(600):
        if log_src.read_text(errors="replace").count("corral-heartbeat") >= 3:
            break
        await asyncio.sleep(0.2)
    writer = None
    if dirty:
        _, writer = await asyncio.open_unix_connection(str(src.console_socket_path(name)))
        writer.write(b"dirty-memory 64\n")
        await writer.drain()
        await asyncio.sleep(2)
    stamps: list[float] = []
    stop = asyncio.Event()
    follower = asyncio.create_task(
        _follow([log_src, dst._vm_dir(name) / "console.log"], stamps, stop)
    )
    await asyncio.sleep(2.5)
    t0 = time.monotonic()
    inc = IncomingMigration(id=f"m{run}", source="s", accel="tcg")
    report = await QemuMigrator(dst).start_incoming(name, inc, "127.0.0.2")
    assert report.uri
    out = OutgoingMigration(id=f"m{run}", target="t", uri=report.uri)
    final = None
    async for r in QemuMigrator(src).outgoing(name, out, set()):
        final = r
    total = time.monotonic() - t0
    await asyncio.sleep(3)
    stop.set()
    await follower
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    gap = max(gaps) - 1.0 if gaps else float("nan")
    if writer is not None:
        writer.close()
    for d in (src, dst):
        await d.destroy(name)
        await d.close()
    assert final is not None and final.status == "completed", final
    return total, int(final.downtime_ms or 0), gap


def _line(label: str, values: list[float], unit: str) -> str:
    return (
        f"  {label:<22} min {min(values):8.1f}  median {statistics.median(values):8.1f}  "
        f"max {max(values):8.1f} {unit}"
    )


async def main(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bm-", dir="/tmp") as tmp:
        for dirty in (False, True):
            results = [
                await one_run(i + (100 if dirty else 0), dirty, Path(tmp)) for i in range(runs)
            ]
            print(f"256 MiB guest, {'dirtying memory' if dirty else 'idle'}, {runs} runs:")
            print(_line("total time", [r[0] * 1000 for r in results], "ms"))
            print(_line("QEMU downtime", [float(r[1]) for r in results], "ms"))
            print(_line("console gap (outside)", [r[2] * 1000 for r in results], "ms"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(main(parser.parse_args().runs))
