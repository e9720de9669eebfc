"""A VM that requires KVM runs only where QEMU can use KVM (not TCG emulation alone)."""

from __future__ import annotations

from functools import partial
from itertools import compress, filterfalse

from corral.scheduler.feasible.base import Rejected
from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Request

__all__ = ["NAME", "REASON_NO_KVM", "AccelFilter"]

NAME = "accel"
REASON_NO_KVM = "node has no KVM"


class AccelFilter:
    name = NAME

    def applies(self, request: Request) -> bool:
        return request.requires_kvm

    def run(
        self, ix: ClusterIndex, request: Request, hosts: list[int], rejected: Rejected
    ) -> list[int]:
        kvm, why = ix.static(NAME, partial(_per_host, ix))
        ok = list(compress(hosts, map(kvm.__getitem__, hosts)))
        if len(ok) != len(hosts):
            bad = list(filterfalse(kvm.__getitem__, hosts))
            rejected.update(zip(bad, map(why.__getitem__, bad), strict=True))
        return ok


def _per_host(ix: ClusterIndex) -> tuple[list[bool], list[tuple[str, str]]]:
    """Per host: has it KVM, and why not (unused where it has)."""
    has = [n.accelerators for n in ix.nodes]
    # One sentence per set of accelerators (most hosts share a few).
    said = {
        a: (NAME, f"{REASON_NO_KVM} (accelerators: {', '.join(sorted(a)) or 'none reported'})")
        for a in set(has)
    }
    return [i in ix.kvm_hosts for i in range(len(has))], list(map(said.__getitem__, has))
