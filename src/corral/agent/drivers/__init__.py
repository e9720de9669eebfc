"""Hypervisor drivers, picked by name from one explicit dict.

``DRIVERS`` maps a driver name to its class; ``corral.daemon.drivers.build_driver`` builds the
one an agent's settings name, with that driver's own settings.
"""

from __future__ import annotations

from corral.agent.drivers.base import Driver, DriverVm, RuntimeState
from corral.agent.drivers.fake import FakeDriver
from corral.agent.drivers.qemu import QemuDriver

__all__ = [
    "DRIVERS",
    "Driver",
    "DriverVm",
    "FakeDriver",
    "QemuDriver",
    "RuntimeState",
]

# Explicit on purpose: no plugin discovery, so `--driver` can only name what ships here.
DRIVERS: dict[str, type[Driver]] = {
    "fake": FakeDriver,
    "qemu": QemuDriver,
}
