"""The cluster record, written once at bootstrap."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ClusterConfig", "ClusterInfo", "LeaderRecord"]


class ClusterConfig(BaseModel):
    """Cluster-wide settings, changed with ``PATCH /api/v1/cluster``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    desired_voters: Literal[1, 3, 5] = Field(
        default=3, description="etcd voters to keep; other server hosts stay learners (standbys)"
    )
    server_dead_grace_s: float = Field(
        default=300.0,
        ge=5,
        le=86400,
        description="seconds a dead server keeps its etcd membership before it is replaced",
    )
    placement_policy: Literal["spread", "binpack", "balanced"] = Field(
        default="spread",
        description="how hosts that fit are ranked, unless a VM sets its own placement_policy",
    )
    auto_rebalance_minutes: int = Field(
        default=0,
        ge=0,
        le=7 * 24 * 60,
        description="run the rebalancer every N minutes (0: never, the default)",
    )


class ClusterInfo(BaseModel):
    """Written once at bootstrap; ``gossip_key`` is secret and handed only to joining hosts."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    created_at: datetime
    bootstrap_node: str
    gossip_key: str = ""
    config: ClusterConfig = Field(default_factory=ClusterConfig)


class LeaderRecord(BaseModel):
    """Value of the election key; the key's create_revision is the term (fencing token)."""

    model_config = ConfigDict(extra="forbid")

    node: str
    address: str
    since: datetime
