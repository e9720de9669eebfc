"""The host must carry every ``node_selector`` label with the same value, and every
``required_labels`` key with any value."""

from __future__ import annotations

from functools import partial
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
                why = ix.static((NAME, key, want), partial(_mismatch, ix, key, want))
                bad = list(filterfalse(match.__getitem__, hosts))
                rejected.update(zip(bad, map(why.__getitem__, bad), strict=True))
            hosts = ok
        for key in request.required_labels:
            has = ix.static((NAME, key), partial(_present, ix, key))
            ok = list(compress(hosts, map(has.__getitem__, hosts)))
            if len(ok) != len(hosts):
                missing = (NAME, f"{REASON_LABEL_MISSING} ({key})")
                rejected.update(zip(filterfalse(has.__getitem__, hosts), repeat(missing)))
            hosts = ok
        return hosts


def _mismatch(ix: ClusterIndex, key: str, want: str) -> list[tuple[str, str]]:
    """Per host: why it does not match ``key=want`` (unused where it does)."""
    values = ix.label_values(key)
    # One sentence per value (most hosts share a few).
    said = {
        have: (
            NAME,
            f"{REASON_LABEL_MISMATCH} ({key}={want!r} wanted, node has "
            f"{'unset' if have is None else repr(have)})",
        )
        for have in set(values)
    }
    return list(map(said.__getitem__, values))


def _present(ix: ClusterIndex, key: str) -> list[bool]:
    """Per host: does it carry label ``key``."""
    return [v is not None for v in ix.label_values(key)]
