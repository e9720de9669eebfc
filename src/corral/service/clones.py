"""Making the disks of a new VM from another VM's or a template's volumes, on their hosts.

Three ways (``DiskCloner.make``), each done on the hosts (``call_host_vms``) before the records
say the files exist:

- **linked, from a template**: a thin overlay on the template's read-only volume, on its host;
- **linked, from a VM** (``vm clone --linked``): the VM's current disk files become read-only
  **bases** (new volume records held by ``BASE_HOLDER``); the VM moves onto new overlays at
  the same instant (a running VM keeps running: ``drivers/qemu/layers.py``) and the clone gets
  overlays on the same bases. The VM's volume records then name their new active file
  (``status.file_name``) and the base (``spec.backing_volume``). A base is never written or
  deleted while a volume names it as backing; the volume loop removes it after the last one;
- **full**: a flattened copy, on the source host (from a temporary snapshot of a running VM),
  or on another host (``to``): the source host exports the data read-only over NBD and the
  target host copies it in with ``qemu-img convert`` (``agent/disk_export.py``).
"""

from __future__ import annotations

import builtins
import contextlib
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from corral.control.hostcall import call_host_vms
from corral.control.vms import assigned_disk
from corral.errors import Conflict, CorralError, ValidationFailed
from corral.model import Node, Pool, Vm, Volume, new_id, utcnow
from corral.model.storage import BASE_HOLDER, VolumeSpec, VolumeStatus
from corral.service.context import ServiceContext
from corral.state import Delete, Expect, Objects, Put

__all__ = ["CloneMode", "DiskCloner", "dependants", "volume_dependants"]

CloneMode = Literal["linked", "full", "link-vm"]


def volume_dependants(volumes: builtins.list[Volume], name: str) -> builtins.list[Volume]:
    """The volumes (not being deleted) whose backing volume is ``name``."""
    return [v for v in volumes if v.spec.backing_volume == name and v.status.state != "deleting"]


async def dependants(ctx: ServiceContext, name: str) -> builtins.list[Volume]:
    page = await ctx.objects.list(Volume, limit=1000, cursor=None)
    return volume_dependants(page.items, name)


@dataclass
class DiskCloner:
    ctx: ServiceContext

    async def node(self, name: str | None, what: str) -> Node:
        node = await self.ctx.objects.find(Node, name) if name else None
        if node is None or node.status.state != "ready":
            state = node.status.state if node else "unknown"
            raise Conflict(f"{what} lives on host {name or '(none)'}, which is {state}")
        return node

    async def pool(self, name: str | None, mode: CloneMode) -> Pool | None:
        """The pool the copies go to (None: each source's own); refuses what cannot be."""
        if name is None:
            return None
        if mode != "full":
            raise ValidationFailed.one(
                "pool",
                "full-only",
                f"a linked clone lives in the pool of the base it reads; make a full copy to "
                f"put the disks in pool {name} (--full --pool {name})",
            )
        pool = await self.ctx.objects.find(Pool, name)
        if pool is None:
            raise ValidationFailed.one("pool", "exists", f"no pool {name!r}; see `corral pool ls`")
        return pool

    async def target(
        self,
        to: str | None,
        sources: builtins.list[Volume],
        mode: CloneMode,
        pool: Pool | None = None,
    ) -> Node | None:
        """The host the copies go to (None: where the sources are); refuses what cannot be.
        ``pool`` is where the copies go (None: each source's own pool)."""
        if to is None:
            return None
        node = await self.ctx.objects.find(Node, to)
        if node is None:
            raise ValidationFailed.one("to", "node", f"no host {to!r}; see `corral node ls`")
        if node.status.state != "ready":
            raise ValidationFailed.one(
                "to", "ready", f"host {to} is {node.status.state}; pick a ready host"
            )
        for src in sources:
            dest = pool or await self.ctx.objects.find(Pool, src.spec.pool)
            if dest is not None and dest.spec.shared:
                raise ValidationFailed.one(
                    "to",
                    "not-shared",
                    f"the copy of volume {src.name} goes to pool {dest.name}, which every host "
                    "shares: the clone's disks are seen from every host and the scheduler "
                    "places it; clone without --to (or copy into a host-local pool with --pool)",
                )
            if src.status.node == to:
                continue
            if mode != "full":
                raise ValidationFailed.one(
                    "to",
                    "linked-same-host",
                    f"a linked clone reads its base file, which lives on host {src.status.node} "
                    f"(pool {src.spec.pool} is not shared); clone without --to, or make a full "
                    f"copy there (--full --to {to})",
                )
        return node

    async def source_host(self, src: Volume, vm: Vm | None) -> tuple[Node, str | None]:
        """The host to read ``src`` on, and the VM there that may hold it: the VM's host when
        it is placed (a shared pool's file is seen there too), else the volume's."""
        if vm is not None and vm.status.node is not None:
            pool = await self.ctx.objects.find(Pool, src.spec.pool)
            if vm.status.node == src.status.node or (pool is not None and pool.spec.shared):
                return await self.node(vm.status.node, f"vm {vm.name}"), vm.name
        return await self.node(src.status.node, f"volume {src.name}"), None

    async def assigned(self, volume: Volume) -> dict[str, Any]:
        pool = await self.ctx.objects.find(Pool, volume.spec.pool)
        return assigned_disk(volume, pool, None).model_dump()

    # -- the three ways ------------------------------------------------------------------------

    async def make(
        self,
        pairs: builtins.list[tuple[Volume, Volume]],
        mode: CloneMode,
        vm: Vm | None,
        to: Node | None,
    ) -> None:
        """Make the file of each clone (second) from its source (first) and record it ready;
        raises CorralError with nothing recorded for the clones that failed."""
        if mode == "link-vm":
            assert vm is not None
            await self._link_vm(pairs, vm)
            return
        for src, clone in pairs:
            host, holder = await self.source_host(src, vm)
            if mode == "full" and to is not None and to.name != host.name:
                answer = await self._copy_between(host, holder, src, to, clone)
                where = to
            else:
                answer = await call_host_vms(
                    host,
                    {
                        "op": "copy-disk",
                        "vm": holder,
                        "linked": mode == "linked",
                        "source": await self.assigned(src),
                        "target": await self.assigned(clone),
                    },
                )
                where = host
            clone.status = VolumeStatus(
                state="ready",
                node=where.name,
                path=str(answer.get("path")),
                allocated_bytes=answer.get("allocated_bytes"),
            )
            clone.updated_at = utcnow()
            clone.mod_revision = await self.ctx.store.commit([Objects.put(clone)])

    async def _copy_between(
        self, source: Node, holder: str | None, src: Volume, target: Node, clone: Volume
    ) -> dict[str, Any]:
        """Copy ``src`` from host ``source`` into ``clone``'s new file on host ``target``."""
        export = await call_host_vms(
            source, {"op": "export-start", "vm": holder, "disk": await self.assigned(src)}
        )
        try:
            return await call_host_vms(
                target,
                {
                    "op": "import-disk",
                    "target": await self.assigned(clone),
                    "source": {
                        "host": export.get("host"),
                        "port": export.get("port"),
                        "export": export.get("export"),
                    },
                },
            )
        finally:
            with contextlib.suppress(CorralError):
                await call_host_vms(source, {"op": "export-stop", "id": export.get("id")})

    async def _link_vm(self, pairs: builtins.list[tuple[Volume, Volume]], vm: Vm) -> None:
        """Freeze the VM's disks into bases shared with the clone (see the module docstring)."""
        hosts = {src.status.node for src, _ in pairs}
        if len(hosts) != 1:
            raise Conflict(
                f"vm {vm.name}'s disks live on several hosts ({', '.join(sorted(map(str, hosts)))})"
                "; a linked clone needs them on one: make a full clone (--full)"
            )
        host, holder = await self.source_host(pairs[0][0], vm)
        plan = []
        for src, clone in pairs:
            base = f"{src.name[:48]}-base-{secrets.token_hex(3)}"
            top = f"{src.name}-{secrets.token_hex(4)}.qcow2"
            plan.append((src, clone, base, top))
        if any([await self.ctx.objects.find(Volume, b) for _, _, b, _ in plan]):
            raise Conflict("a base volume name is taken; try again")
        answer = await call_host_vms(
            host,
            {
                "op": "link-clone",
                "vm": holder,
                "disks": [
                    {
                        "source": await self.assigned(src),
                        "top": top,
                        "clones": [await self.assigned(clone)],
                    }
                    for src, clone, _, top in plan
                ],
            },
        )
        done = answer.get("disks") or []
        for _ in range(8):
            ops: builtins.list[Put | Delete] = []
            expect: builtins.list[Expect] = []
            now = utcnow()
            for (src0, clone, base, top), made in zip(plan, done, strict=True):
                src = await self.ctx.objects.get(Volume, src0.name)
                if src.file_name != src0.file_name:
                    raise Conflict(
                        f"volume {src.name} moved to another file while it was being frozen "
                        "(another linked clone at the same time?); try again"
                    )
                ops.append(
                    Objects.put(
                        Volume(
                            name=base,
                            id=new_id(),
                            created_at=now,
                            updated_at=now,
                            spec=VolumeSpec(
                                pool=src.spec.pool,
                                size_gib=src.spec.size_gib,
                                image=src.spec.image,
                                full_clone=src.spec.full_clone,
                                backing_volume=src.spec.backing_volume,
                            ),
                            status=VolumeStatus(
                                state="ready",
                                node=src.status.node,
                                path=str(made.get("base")),
                                attached_to=BASE_HOLDER,
                                file_name=src.file_name,
                                message=f"read-only base of vm {vm.name} and its linked clones",
                            ),
                        )
                    )
                )
                expect.append(Objects.expect_missing(Volume, base))
                expect.append(Objects.expect_unchanged(src))
                src.spec.backing_volume = base
                src.status.file_name = top
                src.status.path = str(made.get("top"))
                src.updated_at = now
                ops.append(Objects.put(src))
                clone.spec.backing_volume = base
                clone.status = VolumeStatus(
                    state="ready",
                    node=host.name,
                    path=str((made.get("clones") or [""])[0]),
                    allocated_bytes=(made.get("allocated_bytes") or [None])[0],
                )
                clone.updated_at = now
                ops.append(Objects.put(clone))
            try:
                await self.ctx.store.commit(ops, expect)
            except Conflict:
                continue
            return
        raise Conflict(
            f"vm {vm.name}'s disks were frozen on host {host.name}, but its volume records kept "
            "changing and do not say so yet; do not start the clone, and report this"
        )
