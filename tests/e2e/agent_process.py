"""A stand-in agent process for the recovery test: it starts guests, then waits to be killed.

Usage: ``python agent_process.py STATE_DIR GUEST_JSON NAME...``. It defines and starts every
NAME with a QemuDriver over STATE_DIR (TCG, the guest image's boot source), prints one JSON line
``{name: {"pid": ..., "started_at": ...}}`` and sleeps until it is killed, holding its QMP
connections open the way a live agent does.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from corral.agent.drivers.base import DriverVm
from corral.agent.drivers.qemu import QemuDriver, load_guest_image
from corral.model import VmSpec


async def main(state_dir: Path, guest_json: Path, names: list[str]) -> None:
    image = load_guest_image(guest_json)
    driver = QemuDriver(state_dir, accel="tcg", boot=image.boot)
    for name in names:
        vm = DriverVm(
            name=name, vm_id=f"id-{name}", epoch=1, spec=VmSpec(memory_mib=256), state="stopped"
        )
        await driver.define(vm)
    started = await asyncio.gather(*(driver.start(name) for name in names))
    report = {
        vm.name: {
            "pid": int(vm.extra["qemu.pid"]),
            "started_at": vm.started_at.isoformat() if vm.started_at else None,
        }
        for vm in started
    }
    print(json.dumps(report), flush=True)
    await asyncio.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]))
