"""Every etcd key corral writes, in one place.

Objects live at ``/corral/v1/<kind>/<name>``; per-node assignments at
``/corral/v1/assign/<node>/<vm>`` so each host watches only its own work.
"""

from __future__ import annotations

__all__ = [
    "CLUSTER",
    "KINDS",
    "LEADER",
    "PKI",
    "PREFIX",
    "alloc_key",
    "assign_key",
    "assign_prefix",
    "idempotency_key",
    "kind_prefix",
    "liveness_key",
    "name_from_key",
    "object_key",
    "placement_key",
]

PREFIX = "/corral/v1/"
CLUSTER = PREFIX + "cluster"
LEADER = PREFIX + "leader"
# The cluster's CAs (model/pki.py); written once at bootstrap.
PKI = PREFIX + "pki"

# Kinds stored under /corral/v1/<kind>/<name>.
KINDS = frozenset(
    {
        "nodes",
        "vms",
        "tasks",
        "tokens",
        "pools",
        "volumes",
        "images",
        "snapshots",
        "templates",
        "migrations",
        "groups",
    }
)


def _check(part: str, what: str) -> str:
    if not part or "/" in part:
        raise ValueError(f"{what} {part!r} is not a valid key part")
    return part


def kind_prefix(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    return f"{PREFIX}{kind}/"


def object_key(kind: str, name: str) -> str:
    return kind_prefix(kind) + _check(name, "name")


def name_from_key(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def assign_prefix(node: str) -> str:
    return f"{PREFIX}assign/{_check(node, 'node')}/"


def assign_key(node: str, vm: str) -> str:
    return assign_prefix(node) + _check(vm, "vm")


def liveness_key(node: str) -> str:
    return f"{PREFIX}liveness/{_check(node, 'node')}"


LIVENESS_PREFIX = PREFIX + "liveness/"
IDEMPOTENCY_PREFIX = PREFIX + "idempotency/"
# Per host: what the VMs placed there take (the plan applier compares its mod_revision).
ALLOC_PREFIX = PREFIX + "alloc/"
# Per VM: the scheduler's last answer for it (``corral vm why``).
PLACEMENT_PREFIX = PREFIX + "placements/"


def alloc_key(node: str) -> str:
    return ALLOC_PREFIX + _check(node, "node")


def placement_key(vm: str) -> str:
    return PLACEMENT_PREFIX + _check(vm, "vm")


def idempotency_key(scope: str, key: str) -> str:
    """The record of one Idempotency-Key; ``scope`` is the route it was used on."""
    return f"{IDEMPOTENCY_PREFIX}{_check(scope, 'scope')}/{_check(key, 'idempotency key')}"
