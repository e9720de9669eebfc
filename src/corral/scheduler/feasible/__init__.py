"""Filters: each rule in its own module, each rejection with a reason constant."""

from __future__ import annotations

from collections.abc import Callable

from corral.scheduler.feasible.capacity import fits_cpu, fits_memory
from corral.scheduler.feasible.ready import is_compute, is_ready
from corral.scheduler.snapshot import NodeView, Request, Snapshot

__all__ = ["FILTERS", "Filter"]

# A filter returns None when the node passes, or the reason it does not.
Filter = Callable[[Snapshot, NodeView, Request], str | None]

# Cheap state checks first, then capacity.
FILTERS: tuple[Filter, ...] = (is_ready, is_compute, fits_memory, fits_cpu)
