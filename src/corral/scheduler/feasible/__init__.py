"""Filters: one rule per module, each rejection recorded as (filter name, sentence).

The chain, in the order it runs (cheap and request-independent first, the rule that looks at
the other survivors last):

========= ================= ===================================================
kind      name              rule
========= ================= ===================================================
host      ready             node state is ``ready``
host      maintenance       not in maintenance, not cordoned (draining)
host      role              node has the ``compute`` role
request   labels            node selector equal, required labels present
request   pools             each disk's pool is on the host or shared
request   accel             KVM present when the VM requires it
request   migration         target is not the source; QEMU new enough; machine type
request   memory            memory fits ``(memory - reserved) * ratio``
request   cpu               vCPUs fit ``(cpus - reserved) * ratio``
request   disk              disks fit their pools' free bytes
request   affinity          same host as the named VM / affinity group
request   anti-affinity     at most ``max_per_node`` of the group per host
request   spread-over       group evenly spread over the zone/rack label
========= ================= ===================================================
"""

from __future__ import annotations

from corral.scheduler.feasible.accel import AccelFilter
from corral.scheduler.feasible.affinity import AffinityFilter
from corral.scheduler.feasible.anti_affinity import AntiAffinityFilter
from corral.scheduler.feasible.base import HostFilter, Rejected, RequestFilter
from corral.scheduler.feasible.cpu import CpuFilter
from corral.scheduler.feasible.disk import DiskFilter
from corral.scheduler.feasible.failure_domain import FailureDomainFilter
from corral.scheduler.feasible.labels import LabelFilter
from corral.scheduler.feasible.maintenance import MaintenanceFilter
from corral.scheduler.feasible.memory import MemoryFilter
from corral.scheduler.feasible.migration import MigrationFilter
from corral.scheduler.feasible.pools import PoolFilter
from corral.scheduler.feasible.ready import ReadyFilter
from corral.scheduler.feasible.role import RoleFilter

__all__ = ["HOST_FILTERS", "REQUEST_FILTERS", "HostFilter", "Rejected", "RequestFilter"]

HOST_FILTERS: tuple[HostFilter, ...] = (ReadyFilter(), MaintenanceFilter(), RoleFilter())

REQUEST_FILTERS: tuple[RequestFilter, ...] = (
    LabelFilter(),
    PoolFilter(),
    AccelFilter(),
    MigrationFilter(),
    MemoryFilter(),
    CpuFilter(),
    DiskFilter(),
    AffinityFilter(),
    AntiAffinityFilter(),
    FailureDomainFilter(),
)
