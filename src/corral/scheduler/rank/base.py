"""The shape of a scorer.

A scorer gives each feasible host a score in [0, 1] (higher is better) and says how much it
weighs for this request; a weight of 0 leaves it out (its column stays empty in ``vm why``).
A host's total is the weighted sum of its scores; the highest total wins.
"""

from __future__ import annotations

from typing import Protocol

from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Policy, Request

__all__ = ["Scorer"]


class Scorer(Protocol):
    name: str

    def weight(self, ix: ClusterIndex, request: Request, policy: Policy) -> float:
        """How much this scorer counts for ``request`` under ``policy``; 0 to skip it."""

    def score(self, ix: ClusterIndex, request: Request, hosts: list[int]) -> list[float]:
        """One score in [0, 1] per host of ``hosts``, in the same order."""
