"""The host must carry every ``node_selector`` label with the same value, and every
``required_labels`` key with any value."""

from __future__ import annotations

from itertools import compress, filterfalse, repeat

from corral.scheduler.feasible.base import Rejected
from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Request

__all__ = ["NAME", "REASON_LABEL_MISMATCH", "REASON_LABEL_MISSING", "LabelFilter"]

NAME = "labels"
REASON_LABEL_MISMATCH = "node selector does not match"
REASON_LABEL_MISSING = "required label missing"


class LabelFilter:
    name = NAME

    def applies(self, request: Request) -> bool:
        return bool(request.node_selector or request.required_labels)

    def run(
        self, ix: ClusterIndex, request: Request, hosts: list[int], rejected: Rejected
    ) -> list[int]:
        for key, want in sorted(request.node_selector.items()):
            match = ix.label_mask(key, want)
            ok = list(compress(hosts, map(match.__getitem__, hosts)))
            if len(ok) != len(hosts):
                has = ix.labels_of(key)
                bad = list(filterfalse(match.__getitem__, hosts))
                # One sentence per value the other hosts have (most share a few).
                said = {
                    have: (
                        NAME,
                        f"{REASON_LABEL_MISMATCH} ({key}={want!r} wanted, node has "
                        f"{'unset' if have is None else repr(have)})",
                    )
                    for have in set(map(has.get, bad))
                }
                rejected.update(zip(bad, map(said.__getitem__, map(has.get, bad)), strict=True))
            hosts = ok
        for key in request.required_labels:
            has = ix.labels_of(key)
            ok = list(filter(has.__contains__, hosts))
            if len(ok) != len(hosts):
                missing = (NAME, f"{REASON_LABEL_MISSING} ({key})")
                rejected.update(zip(filterfalse(has.__contains__, hosts), repeat(missing)))
            hosts = ok
        return hosts
