"""Pure value types shared by the API and the state (pydantic v2). No I/O here."""

from corral.model.assignment import Assignment, VmObservation
from corral.model.cluster import ClusterConfig, ClusterInfo, LeaderRecord
from corral.model.common import Labels, Name, new_id, rfc3339, utcnow
from corral.model.group import Group, GroupCreate, GroupSpec, GroupStatus
from corral.model.idempotency import IdempotencyRecord
from corral.model.migration import Migration, MigrationReport
from corral.model.node import Allocated, HostCpu, Inventory, Node, NodeSpec, NodeStatus, cpu_gap
from corral.model.storage import (
    Image,
    ImageCreate,
    ImageSpec,
    ImageStatus,
    Pool,
    PoolCreate,
    PoolSpec,
    Volume,
    VolumeCreate,
    VolumeSpec,
    VolumeStatus,
)
from corral.model.task import FINAL_TASK_STATES, Step, Target, Task, TaskSpec, TaskStatus
from corral.model.token import Token, TokenCreate, TokenSpec, TokenStatus
from corral.model.vm import Vm, VmCreate, VmDisk, VmSpec, VmStatus

__all__ = [
    "FINAL_TASK_STATES",
    "Allocated",
    "Assignment",
    "ClusterConfig",
    "ClusterInfo",
    "Group",
    "GroupCreate",
    "GroupSpec",
    "GroupStatus",
    "HostCpu",
    "IdempotencyRecord",
    "Image",
    "ImageCreate",
    "ImageSpec",
    "ImageStatus",
    "Inventory",
    "Labels",
    "LeaderRecord",
    "Migration",
    "MigrationReport",
    "Name",
    "Node",
    "NodeSpec",
    "NodeStatus",
    "Pool",
    "PoolCreate",
    "PoolSpec",
    "Step",
    "Target",
    "Task",
    "TaskSpec",
    "TaskStatus",
    "Token",
    "TokenCreate",
    "TokenSpec",
    "TokenStatus",
    "Vm",
    "VmCreate",
    "VmDisk",
    "VmObservation",
    "VmSpec",
    "VmStatus",
    "Volume",
    "VolumeCreate",
    "VolumeSpec",
    "VolumeStatus",
    "cpu_gap",
    "new_id",
    "rfc3339",
    "utcnow",
]
