"""The volume loop: remove volumes marked ``deleting`` once no VM uses them, and let go of
volumes whose VM is gone.

A volume's file is removed through its host (``hostcall``); when that host does not answer the
volume stays ``deleting`` with the reason, and is retried. A volume that never got a file
(``pending``) goes at once. A host that is down for good (``left``) has no file to remove.
"""

from __future__ import annotations

from corral.control.context import LeaderContext
from corral.control.hostcall import call_host_storage
from corral.control.queue import Outcome
from corral.control.vms import assigned_disk
from corral.errors import CorralError
from corral.model import Volume
from corral.model.common import utcnow
from corral.state import Objects

__all__ = ["VolumeLoop"]

RETRY_S = 10.0


class VolumeLoop:
    def __init__(self, ctx: LeaderContext) -> None:
        self.ctx = ctx

    def _user(self, volume: Volume) -> str | None:
        """The VM that still lists the volume among its disks, if any."""
        name = volume.status.attached_to
        if not name:
            return None
        if name.startswith("template:"):
            return name  # a template's read-only volume: held for as long as the template
        vm = self.ctx.vm(name)
        if vm is None or not any(d.volume == volume.name for d in vm.spec.disks):
            return None
        return name

    async def reconcile(self, name: str) -> Outcome:
        volume = self.ctx.volume(name)
        if volume is None:
            return Outcome()
        user = self._user(volume)
        if volume.status.attached_to and user is None:
            volume.status.attached_to = None
            volume.updated_at = utcnow()
            await self.ctx.commit([Objects.put(volume)], [Objects.expect_unchanged(volume)])
            return Outcome(f"volume {name} is no longer attached (its vm is gone)")
        if volume.status.state != "deleting":
            return Outcome()
        if user is not None:
            return Outcome(f"volume {name} waits for vm {user} to go", requeue_after=RETRY_S)
        host = self.ctx.node(volume.status.node) if volume.status.node else None
        if volume.status.path and host is not None and host.status.state != "left":
            pool = self.ctx.pool(volume.spec.pool)
            try:
                await call_host_storage(
                    host, {"op": "delete", "disk": assigned_disk(volume, pool, None).model_dump()}
                )
            except CorralError as exc:
                message = f"cannot remove its file yet: {exc.detail}"
                if volume.status.message != message:
                    volume.status.message = message
                    volume.updated_at = utcnow()
                    await self.ctx.commit([Objects.put(volume)], [Objects.expect_unchanged(volume)])
                return Outcome(f"volume {name}: {message}", requeue_after=RETRY_S)
        await self.ctx.commit([Objects.delete(Volume, name)], [Objects.expect_unchanged(volume)])
        return Outcome(f"deleted volume {name}")
