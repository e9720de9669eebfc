"""Hypervisor drivers, picked by name from one explicit dict.

``DRIVERS`` maps a driver name to its constructor. ``make_driver(name, ...)`` builds one and
raises ``ValueError`` naming the known drivers when ``name`` is not among them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corral.agent.drivers.base import Driver, DriverVm, RuntimeState
from corral.agent.drivers.fake import FakeDriver

__all__ = ["DRIVERS", "Driver", "DriverVm", "FakeDriver", "RuntimeState", "make_driver"]

# Explicit on purpose: no plugin discovery, so `--driver` can only name what ships here.
DRIVERS: dict[str, Callable[..., Driver]] = {
    "fake": FakeDriver,
}


def make_driver(name: str, /, *args: Any, **kwargs: Any) -> Driver:
    """Build the driver called ``name`` with the constructor's own arguments.

    Raises ``ValueError("unknown driver 'x': choose one of fake")`` for an unknown name.
    """
    try:
        factory = DRIVERS[name]
    except KeyError:
        known = ", ".join(sorted(DRIVERS))
        raise ValueError(f"unknown driver {name!r}: choose one of {known}") from None
    return factory(*args, **kwargs)
