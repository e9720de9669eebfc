"""Real QEMU guests under TCG: the test guest is built (or found in its cache) once per session.

``guest_image`` runs ``guest/build.sh`` into ``$CORRAL_GUEST_DIR`` (default
``<repo>/.cache/guest``) and fails the session with the script's own words when it cannot.
``drivers`` makes QemuDrivers over short state directories (unix socket paths are limited to
107 bytes) and, whatever a test did, leaves no QEMU of its VMs running afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from corral.agent.drivers.qemu import GuestImage, QemuDriver, load_guest_image
from corral.agent.drivers.qemu.handle import load_handles
from corral.agent.drivers.qemu.process import is_vm_process, signal_vm, wait_exit

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "guest" / "build.sh"
REQUIRED_TOOLS = ("qemu-system-x86_64", "qemu-img", "qemu-io")


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The test guest (see guest/README.md), built once per session or taken from its cache."""
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"e2e tests need {', '.join(missing)}: run scripts/host-deps.sh", pytrace=False)
    out = Path(os.environ.get("CORRAL_GUEST_DIR", REPO / ".cache" / "guest"))
    try:
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT), str(out)],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"guest/build.sh {out} did not finish within 900 s", pytrace=False)
    if result.returncode != 0:
        pytest.fail(
            f"cannot build the test guest: guest/build.sh {out} exited {result.returncode}:\n"
            f"{result.stderr.strip()}",
            pytrace=False,
        )
    try:
        return load_guest_image(out / "tiny.json")
    except ValueError as exc:
        pytest.fail(f"guest/build.sh succeeded but its output is unusable: {exc}", pytrace=False)


@dataclass
class DriverFactory:
    """Makes QemuDrivers; ``cleanup`` kills every QEMU any of them (or a child agent) left."""

    image: GuestImage
    state_dirs: list[Path] = field(default_factory=list)
    drivers: list[QemuDriver] = field(default_factory=list)

    def new_state_dir(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="cq-", dir="/tmp"))
        self.state_dirs.append(path)
        return path

    def __call__(self, state_dir: Path | None = None, **options: Any) -> QemuDriver:
        """A driver with the test guest as default boot source; TCG and a short stop timeout
        unless ``options`` say otherwise."""
        settings: dict[str, Any] = {"accel": "tcg", "boot": self.image.boot, "stop_timeout_s": 20}
        settings.update(options)
        driver = QemuDriver(state_dir or self.new_state_dir(), **settings)
        self.drivers.append(driver)
        return driver

    async def cleanup(self) -> None:
        for driver in self.drivers:
            await driver.close()
        for state_dir in self.state_dirs:
            for handle in load_handles(state_dir / "vms").values():
                if is_vm_process(handle.pid, handle.uuid):
                    signal_vm(handle.pid, handle.uuid, signal.SIGKILL)
                    await wait_exit(handle.pid, handle.uuid, 5.0)
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
async def drivers(guest_image: GuestImage) -> AsyncIterator[DriverFactory]:
    factory = DriverFactory(guest_image)
    try:
        yield factory
    finally:
        await factory.cleanup()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A short-pathed directory for disk images and helper files."""
    path = Path(tempfile.mkdtemp(prefix="cq-scratch-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
