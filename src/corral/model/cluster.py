"""The cluster record, written once at bootstrap."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

__all__ = ["ClusterInfo", "LeaderRecord"]


class ClusterInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    created_at: datetime
    bootstrap_node: str


class LeaderRecord(BaseModel):
    """Value of the election key; the key's create_revision is the term (fencing token)."""

    model_config = ConfigDict(extra="forbid")

    node: str
    address: str
    since: datetime
