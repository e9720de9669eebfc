"""Placement groups (Nova server groups): VMs that reference a group are kept together or apart.

A VM joins a group with ``VmSpec.group``. ``anti-affinity`` allows at most ``max_per_node``
members per host (hard), ``affinity`` keeps every member on one host (hard); the ``soft-``
policies only move the score by ``weight``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.model.common import Name, ObjectMeta, Strict

__all__ = ["GROUP_POLICIES", "Group", "GroupCreate", "GroupPolicy", "GroupSpec", "GroupStatus"]

GroupPolicy = Literal["anti-affinity", "affinity", "soft-anti-affinity", "soft-affinity"]
GROUP_POLICIES: tuple[str, ...] = GroupPolicy.__args__  # type: ignore[attr-defined]


class GroupSpec(Strict):
    policy: GroupPolicy = Field(
        default="anti-affinity",
        description=(
            "anti-affinity: at most max_per_node members per host; affinity: all on one host; "
            "soft-anti-affinity / soft-affinity: preferences weighted by weight"
        ),
    )
    max_per_node: int = Field(
        default=1, ge=1, le=1000, description="anti-affinity: members allowed on one host"
    )
    weight: float = Field(
        default=1.0, ge=0, le=100, description="soft policies: how much the preference counts"
    )


class GroupCreate(GroupSpec):
    """Body of ``POST /api/v1/groups``."""

    name: Name

    def spec(self) -> GroupSpec:
        return GroupSpec.model_validate(self.model_dump(exclude={"name"}))


class GroupStatus(BaseModel):
    """Filled on read: the members and where they run."""

    model_config = ConfigDict(extra="forbid")

    members: list[str] = Field(default_factory=list)
    nodes: dict[str, str | None] = Field(default_factory=dict)


class Group(ObjectMeta):
    kind: Literal["group"] = "group"
    spec: GroupSpec
    status: GroupStatus = Field(default_factory=GroupStatus)
