"""The ``qemu`` driver: real VMs under ``qemu-system-x86_64``, driven over QMP.

- ``cmdline``: ``QemuConfig`` (validated) and ``build_argv``; boot sources and disks;
- ``qmp``: ``QmpSession``, the only user of ``qemu.qmp`` in corral;
- ``process``: launching, recognising and signalling QEMU processes; the KVM probe;
- ``handle``: the per-VM handle persisted in ``<state_dir>/vms/<name>/handle.json``;
- ``driver``: ``QemuDriver``, the Driver protocol over all of the above.
"""

from __future__ import annotations

from corral.agent.drivers.qemu.cmdline import (
    DirectKernelBoot,
    DiskConfig,
    GuestImage,
    QemuConfig,
    build_argv,
    load_guest_image,
)
from corral.agent.drivers.qemu.driver import GUEST_POWERED_OFF, QemuDriver

__all__ = [
    "GUEST_POWERED_OFF",
    "DirectKernelBoot",
    "DiskConfig",
    "GuestImage",
    "QemuConfig",
    "QemuDriver",
    "build_argv",
    "load_guest_image",
]
