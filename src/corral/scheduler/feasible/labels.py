"""The host must carry every ``node_selector`` label with the same value, and every
``required_labels`` key with any value."""

from __future__ import annotations

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
            has = ix.labels_of(key)
            ok = [i for i in hosts if has.get(i) == want]
            if len(ok) != len(hosts):
                for i in hosts:
                    have = has.get(i)
                    if have != want:
                        shown = "unset" if have is None else repr(have)
                        rejected[i] = (
                            NAME,
                            f"{REASON_LABEL_MISMATCH} ({key}={want!r} wanted, node has {shown})",
                        )
            hosts = ok
        for key in request.required_labels:
            has = ix.labels_of(key)
            ok = [i for i in hosts if i in has]
            if len(ok) != len(hosts):
                for i in hosts:
                    if i not in has:
                        rejected[i] = (NAME, f"{REASON_LABEL_MISSING} ({key})")
            hosts = ok
        return hosts
