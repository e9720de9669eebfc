"""The node agent: inventory, the pure reconcile diff, the runner and hypervisor drivers.

It reaches the servers only through ``corral.agent.nodeapi.NodeService`` and the hypervisor
only through a ``corral.agent.drivers.Driver``; it never imports server modules.
"""

from __future__ import annotations

from corral.agent.inventory import collect_inventory
from corral.agent.nodeapi import NodeService
from corral.agent.reconcile import (
    IgnoredAssignment,
    VmDiff,
    VmPlan,
    VmReplacement,
    VmUpdate,
    diff_vms,
    plan_actions,
)
from corral.agent.runner import NodeAgent

__all__ = [
    "IgnoredAssignment",
    "NodeAgent",
    "NodeService",
    "VmDiff",
    "VmPlan",
    "VmReplacement",
    "VmUpdate",
    "collect_inventory",
    "diff_vms",
    "plan_actions",
]
