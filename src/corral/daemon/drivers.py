"""Build the hypervisor driver an agent's settings ask for."""

from __future__ import annotations

import os
from pathlib import Path

from corral.agent.drivers import Driver, FakeDriver, QemuDriver
from corral.agent.drivers.qemu import load_guest_image
from corral.daemon.settings import AgentSettings

__all__ = ["DriverSetupError", "build_driver", "guest_image_path"]


class DriverSetupError(RuntimeError):
    """The driver cannot be set up; the message says what to do."""


def guest_image_path(settings: AgentSettings) -> Path:
    if settings.guest_image:
        return Path(settings.guest_image)
    guest_dir = os.environ.get("CORRAL_GUEST_DIR")
    return Path(guest_dir) / "tiny.json" if guest_dir else Path(".cache/guest/tiny.json")


def build_driver(settings: AgentSettings, state_dir: Path) -> Driver:
    if settings.driver == "fake":
        return FakeDriver(
            state_dir,
            start_delay_s=settings.fake_start_delay_s,
            stop_delay_s=settings.fake_stop_delay_s,
            fail_start=settings.fake_fail_start,
        )
    image = guest_image_path(settings)
    try:
        boot = load_guest_image(image.resolve()).boot
    except (OSError, ValueError) as exc:
        raise DriverSetupError(
            f"the qemu driver needs a guest image to boot and {image} is not usable ({exc}); "
            "build the test guest with `make guest` (guest/build.sh), pass --guest-image, "
            "or run with --driver fake"
        ) from exc
    return QemuDriver(
        state_dir,
        qemu_binary=settings.qemu_binary,
        accel=settings.qemu_accel,  # type: ignore[arg-type]
        stop_timeout_s=settings.stop_timeout_s,
        boot=boot,
    )
