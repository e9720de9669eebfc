"""Starting a VM: ``QemuDriver.start`` next to launching the same QEMU argv by hand.

For each of N guests (default 10) of the test guest (guest/README.md), under TCG, it measures
the time from the call to QMP reporting ``running`` and to the guest's first
``corral-heartbeat`` on the console. The "by hand" runs launch the argv the driver would use
(``QemuDriver.command_line``) with a bare subprocess and a raw QMP exchange, so the difference
is the driver's own overhead: validation, handle writes, the qemu.qmp session. Driver and hand
runs alternate, one guest at a time, so both see the same machine load.

It then does the same through the whole cluster: one agent process (qemu driver, TCG) with the
test guest imported as image ``tiny``; for each guest, ``POST /api/v1/vms`` (image ``tiny``,
started) and the time until the API shows the VM ``running`` (the node reports it once QMP says
``running``) and until ``GET .../console/log`` shows the first heartbeat. The ratio of those
medians to the by-hand ones is what corral adds end to end (API, etcd, leader, agent, disk
clone, driver).

Run: ``make bench`` or ``.venv/bin/python -m bench.vm_start [--count 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.integration.harness import AgentProcess

from corral.agent.drivers.base import DriverVm
from corral.agent.drivers.qemu import QemuDriver, load_guest_image
from corral.agent.drivers.qemu.process import wait_exit
from corral.model import VmSpec

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT = b"corral-heartbeat 1"


def has_heartbeat(log: Path) -> bool:
    try:
        return HEARTBEAT in log.read_bytes()
    except FileNotFoundError:
        return False


async def wait_heartbeat(log: Path, t0: float, timeout_s: float = 120.0) -> float:
    """Seconds from ``t0`` until the console log shows the first heartbeat."""
    while True:
        if has_heartbeat(log):
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout_s:
            raise RuntimeError(f"no heartbeat in {log} after {timeout_s} s")
        await asyncio.sleep(0.01)


async def qmp(sock: Path, *commands: str) -> list[dict[str, object]]:
    """A raw QMP exchange: greeting, capabilities, then ``commands``; their replies."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    replies: list[dict[str, object]] = []
    try:
        await reader.readline()  # the greeting
        for command in ("qmp_capabilities", *commands):
            writer.write(json.dumps({"execute": command}).encode() + b"\n")
            await writer.drain()
            while True:
                line = await reader.readline()
                if not line:
                    return replies
                msg = json.loads(line)
                if "event" not in msg:
                    replies.append(msg)
                    break
    finally:
        writer.close()
        await writer.wait_closed()
    return replies


async def by_hand(argv: list[str], run_dir: Path) -> tuple[float, float]:
    """Launch ``argv`` and poll QMP until running; (to running, to first heartbeat)."""
    sock, log = run_dir / "qmp.sock", run_dir / "console.log"
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*argv, stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(err.decode())
    while True:
        status = (await qmp(sock, "query-status"))[-1]["return"]
        if isinstance(status, dict) and status.get("status") == "running":
            break
        await asyncio.sleep(0.01)
    to_running = time.perf_counter() - t0
    to_heartbeat = await wait_heartbeat(log, t0)
    pid = int((run_dir / "qemu.pid").read_text())
    await qmp(sock, "quit")
    if not await wait_exit(pid, argv[argv.index("-uuid") + 1], 10.0):
        raise RuntimeError(f"qemu {pid} did not quit")
    return to_running, to_heartbeat


async def with_driver(driver: QemuDriver, name: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    await driver.start(name)
    to_running = time.perf_counter() - t0
    to_heartbeat = await wait_heartbeat(driver.console_log_path(name), t0)
    await driver.stop(name, force=True)
    return to_running, to_heartbeat


def through_api(count: int, guest_dir: Path) -> tuple[list[float], list[float]]:
    """POST /vms -> API says running, and -> first heartbeat in the console log, per guest."""
    data = Path(tempfile.mkdtemp(prefix="cq-bapi-", dir="/tmp"))
    agent = AgentProcess(
        data / "n1",
        env={
            "CORRAL_DRIVER": "qemu",
            "CORRAL_GUEST_IMAGE": str(guest_dir / "tiny.json"),
            "CORRAL_QEMU_ACCEL": "tcg",
            "CORRAL_STOP_TIMEOUT_S": "5",
        },
    )
    running: list[float] = []
    heartbeat: list[float] = []
    try:
        agent.start()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "corral",
                "--addr",
                agent.url,
                "image",
                "import",
                "tiny",
                "--file",
                str(guest_dir / "tiny.json"),
            ],
            check=True,
            capture_output=True,
        )
        with agent.client(timeout=60) as c:
            for i in range(count):
                name = f"api-{i}"
                t0 = time.perf_counter()
                r = c.post("/api/v1/vms", json={"name": name, "image": "tiny", "memory_mib": 256})
                r.raise_for_status()
                while c.get(f"/api/v1/vms/{name}").json()["status"]["state"] != "running":
                    if time.perf_counter() - t0 > 120:
                        raise RuntimeError(f"vm {name} not running after 120 s")
                    time.sleep(0.01)
                running.append(time.perf_counter() - t0)
                while HEARTBEAT not in c.get(f"/api/v1/vms/{name}/console/log").content:
                    if time.perf_counter() - t0 > 120:
                        raise RuntimeError(f"vm {name}: no heartbeat after 120 s")
                    time.sleep(0.01)
                heartbeat.append(time.perf_counter() - t0)
                c.delete(
                    f"/api/v1/vms/{name}",
                    params={"with_disks": "true", "wait": "true", "timeout": 60},
                ).raise_for_status()
    finally:
        with contextlib.suppress(Exception):
            agent.stop(timeout_s=60)
        shutil.rmtree(data, ignore_errors=True)
    return running, heartbeat


def row(label: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"{label:<28} min {min(ms):8.1f} ms  median {statistics.median(ms):8.1f} ms  "
        f"max {max(ms):8.1f} ms"
    )


async def main(count: int, guest_dir: Path) -> None:
    image = load_guest_image(guest_dir / "tiny.json")
    with tempfile.TemporaryDirectory(prefix="cq-bench-", dir="/tmp") as tmp:
        driver = QemuDriver(Path(tmp), accel="tcg", boot=image.boot)
        results: dict[str, list[float]] = {k: [] for k in ("dr", "dh", "hr", "hh")}
        try:
            for i in range(count):
                for kind in ("driver", "hand") if i % 2 == 0 else ("hand", "driver"):
                    name = f"{kind}-{i}"
                    vm = DriverVm(
                        name=name,
                        vm_id=name,
                        epoch=1,
                        spec=VmSpec(memory_mib=256),
                        state="stopped",
                    )
                    await driver.define(vm)
                    if kind == "driver":
                        running, heartbeat = await with_driver(driver, name)
                        results["dr"].append(running)
                        results["dh"].append(heartbeat)
                    else:
                        argv = await driver.command_line(name)
                        run_dir = driver.console_log_path(name).parent
                        running, heartbeat = await by_hand(argv, run_dir)
                        results["hr"].append(running)
                        results["hh"].append(heartbeat)
                    await driver.destroy(name)
        finally:
            for vm in await driver.list():
                await driver.destroy(vm.name)
            await driver.close()
    print(f"vm start under TCG, {count} guests each way, {os.cpu_count()} CPUs")
    print(row("driver: start -> running", results["dr"]))
    print(row("by hand: launch -> running", results["hr"]))
    print(row("driver: -> first heartbeat", results["dh"]))
    print(row("by hand: -> first heartbeat", results["hh"]))
    for label, a, b in (("running", "dr", "hr"), ("first heartbeat", "dh", "hh")):
        ratio = statistics.median(results[a]) / statistics.median(results[b])
        print(f"median ratio driver / by hand, to {label}: {ratio:.2f}")
    results["ar"], results["ah"] = await asyncio.to_thread(through_api, count, guest_dir)
    print(row("API: POST /vms -> running", results["ar"]))
    print(row("API: -> first heartbeat", results["ah"]))
    for label, a, b in (("running", "ar", "hr"), ("first heartbeat", "ah", "hh")):
        ratio = statistics.median(results[a]) / statistics.median(results[b])
        print(f"median ratio API / by hand, to {label}: {ratio:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument(
        "--guest-dir",
        type=Path,
        default=Path(os.environ.get("CORRAL_GUEST_DIR", REPO / ".cache" / "guest")),
    )
    args = parser.parse_args()
    subprocess.run(["bash", str(REPO / "guest" / "build.sh"), str(args.guest_dir)], check=True)
    asyncio.run(main(args.count, args.guest_dir))
