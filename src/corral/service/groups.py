"""Placement groups: create, list, show (with members and their hosts), delete."""

from __future__ import annotations

import builtins
from typing import Any

from corral.errors import Conflict
from corral.model import Group, GroupCreate, GroupStatus, Vm, new_id, utcnow
from corral.service.context import ServiceContext
from corral.service.validate import parse
from corral.state import Objects

__all__ = ["GroupService"]


class GroupService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def create(self, body: Any) -> Group:
        req = parse(GroupCreate, body)
        now = utcnow()
        group = Group(name=req.name, id=new_id(), created_at=now, updated_at=now, spec=req.spec())
        try:
            rev = await self.ctx.store.commit(
                [Objects.put(group)], [Objects.expect_missing(Group, group.name)]
            )
        except Conflict:
            raise Conflict(
                f"group {group.name!r} already exists; pick another name or delete it first"
            ) from None
        group.create_revision = group.mod_revision = rev
        return group

    async def list(self) -> tuple[builtins.list[Group], int]:
        groups, revision = await self.ctx.objects.all(Group)
        vms, _ = await self.ctx.objects.all(Vm, serializable=True)
        return [self._with_members(g, vms) for g in groups], revision

    async def get(self, name: str) -> Group:
        group = await self.ctx.objects.get(Group, name)
        vms, _ = await self.ctx.objects.all(Vm, serializable=True)
        return self._with_members(group, vms)

    async def delete(self, name: str) -> Group:
        group = await self.get(name)
        if group.status.members:
            shown = ", ".join(group.status.members[:10])
            raise Conflict(
                f"group {name!r} still has {len(group.status.members)} members ({shown}); "
                "delete them or take them out of the group first "
                '(PATCH /api/v1/vms/NAME with {"group": null})'
            )
        await self.ctx.store.commit(
            [Objects.delete(Group, name)], [Objects.expect_unchanged(group)]
        )
        return group

    @staticmethod
    def _with_members(group: Group, vms: builtins.list[Vm]) -> Group:
        members = sorted(v.name for v in vms if v.spec.group == group.name)
        nodes = {v.name: v.status.node for v in vms if v.spec.group == group.name}
        group.status = GroupStatus(members=members, nodes=nodes)
        return group
