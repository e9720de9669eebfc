"""A live migration's target must not be its source, must run a QEMU at least as new as the
source's, and must offer the VM's machine type (QEMU cannot load a newer or unknown machine's
migration stream)."""

from __future__ import annotations

from corral.scheduler.feasible.base import Rejected
from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Request

__all__ = [
    "NAME",
    "REASON_IS_SOURCE",
    "REASON_MACHINE_TYPE",
    "REASON_QEMU_TOO_OLD",
    "REASON_QEMU_UNKNOWN",
    "MigrationFilter",
]

NAME = "migration"
REASON_IS_SOURCE = "node is the migration source"
REASON_QEMU_TOO_OLD = "qemu older than the source's"
REASON_QEMU_UNKNOWN = "qemu version unknown"
REASON_MACHINE_TYPE = "machine type not supported"


def _version(v: tuple[int, ...]) -> str:
    return ".".join(str(x) for x in v)


class MigrationFilter:
    name = NAME

    def applies(self, request: Request) -> bool:
        return request.migrating

    def run(
        self, ix: ClusterIndex, request: Request, hosts: list[int], rejected: Rejected
    ) -> list[int]:
        ok = []
        want = request.source_qemu_version
        machine = request.machine_type
        for i in hosts:
            node = ix.nodes[i]
            why = None
            if node.name == request.source:
                why = REASON_IS_SOURCE
            elif want is not None and node.qemu_version is None:
                why = f"{REASON_QEMU_UNKNOWN} (source runs {_version(want)})"
            elif want is not None and node.qemu_version is not None and node.qemu_version < want:
                why = f"{REASON_QEMU_TOO_OLD} ({_version(node.qemu_version)} < {_version(want)})"
            elif machine is not None and machine not in node.machine_types:
                why = f"{REASON_MACHINE_TYPE} ({machine})"
            if why is None:
                ok.append(i)
            else:
                rejected[i] = (NAME, why)
        return ok
