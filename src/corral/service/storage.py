"""Pools, volumes and images: validate, record, and ask the one host that holds a file.

Files live on hosts; records live in etcd. A change that touches a file is done through the
host that holds it (``control.hostcall``) and recorded only when the host did it, so a record
never claims a file that is not there. Volume removal goes through the leader (a volume is
marked ``deleting``; the leader's volume loop removes the file, then the record), because a VM
deleted with its disks can only let go of them once its host destroyed it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from corral.control.hostcall import call_host_storage
from corral.control.vms import assigned_disk
from corral.errors import Conflict, CorralError, NotFound, Unavailable, ValidationFailed
from corral.model import (
    Image,
    ImageCreate,
    Node,
    Pool,
    PoolCreate,
    Task,
    Vm,
    VmDisk,
    Volume,
    VolumeCreate,
    VolumeSpec,
    new_id,
    utcnow,
)
from corral.model.storage import DEFAULT_POOL, IMAGE_FILES, ImageFile, VolumeStatus
from corral.model.vm import MAX_DISKS
from corral.service.context import RequestMeta, ServiceContext
from corral.service.tasks import new_task
from corral.service.validate import parse
from corral.state import Delete, Expect, Objects, Put

__all__ = [
    "ImageService",
    "ImageStore",
    "PoolService",
    "ProbeResult",
    "VolumeService",
    "check_image_url",
]

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass(frozen=True)
class ProbeResult:
    format: str
    virtual_size_bytes: int


class ImageStore(Protocol):
    """This server's image files (``agent.storage.HostStorage`` is one)."""

    async def receive_image_file(
        self,
        image: str,
        image_id: str,
        file: str,
        chunks: AsyncIterator[bytes],
        *,
        max_bytes: int,
        expect_sha256: str | None = None,
    ) -> tuple[Path, str, int]: ...

    async def probe_image(self, path: Path) -> Any: ...

    def open_image_file(self, image: str, image_id: str, file: str) -> Path | None: ...

    def drop_image(self, image: str, image_id: str) -> None: ...


async def _all(ctx: ServiceContext, model: type[Any]) -> list[Any]:
    items: list[Any] = []
    cursor = None
    while True:
        page = await ctx.objects.list(model, limit=1000, cursor=cursor)
        items.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return items


# -- pools ------------------------------------------------------------------------------------


class PoolService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def list(self) -> tuple[list[Pool], int]:
        page = await self.ctx.objects.list(Pool, limit=1000, cursor=None)
        return page.items, page.revision

    async def get(self, name: str) -> Pool:
        return await self.ctx.objects.get(Pool, name)

    async def create(self, body: Any) -> Pool:
        req = parse(PoolCreate, body)
        now = utcnow()
        pool = Pool(name=req.name, id=new_id(), created_at=now, updated_at=now, spec=req.spec())
        try:
            rev = await self.ctx.store.commit(
                [Objects.put(pool)], [Objects.expect_missing(Pool, pool.name)]
            )
        except Conflict:
            raise Conflict(f"pool {pool.name!r} already exists") from None
        pool.create_revision = pool.mod_revision = rev
        return pool

    async def ensure_default(self) -> None:
        """The ``local`` pool (``<data-dir>/pools/local`` on every host) exists."""
        if await self.ctx.objects.find(Pool, DEFAULT_POOL) is None:
            with contextlib.suppress(Conflict):
                await self.create({"name": DEFAULT_POOL})

    async def delete(self, name: str) -> Pool:
        pool = await self.get(name)
        users = [v.name for v in await _all(self.ctx, Volume) if v.spec.pool == name]
        if users:
            raise Conflict(
                f"pool {name!r} still holds volumes {', '.join(sorted(users)[:10])}; delete them "
                "first"
            )
        await self.ctx.store.commit([Objects.delete(Pool, name)], [Objects.expect_unchanged(pool)])
        return pool


# -- volumes ----------------------------------------------------------------------------------


class VolumeService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def list(
        self, *, node: str | None = None, pool: str | None = None
    ) -> tuple[list[Volume], int]:
        page = await self.ctx.objects.list(Volume, limit=1000, cursor=None)
        items = [
            v
            for v in page.items
            if (node is None or v.status.node == node) and (pool is None or v.spec.pool == pool)
        ]
        return items, page.revision

    async def get(self, name: str) -> Volume:
        return await self.ctx.objects.get(Volume, name)

    async def _pool(self, name: str, field: str = "pool") -> Pool:
        pool = await self.ctx.objects.find(Pool, name)
        if pool is None:
            raise ValidationFailed.one(
                field, "exists", f"no pool {name!r}; see `corral pool ls` (the default is local)"
            )
        return pool

    async def _ready_image(self, name: str, field: str = "image") -> Image:
        image = await self.ctx.objects.find(Image, name)
        if image is None:
            raise ValidationFailed.one(
                field, "exists", f"no image {name!r}; see `corral image ls` or import it first"
            )
        if image.status.state != "ready":
            raise ValidationFailed.one(
                field,
                "ready",
                f"image {name!r} is {image.status.state}, not ready: "
                f"{image.status.message or 'wait for its import to finish'}",
            )
        return image

    async def _check_size(self, size_gib: int, field: str = "size_gib") -> None:
        """Refuse a size no host's filesystem could ever hold."""
        nodes = (await self.ctx.objects.list(Node, limit=1000, cursor=None)).items
        sizes = [n.status.inventory.disk_gib for n in nodes if n.status.inventory is not None]
        if sizes and size_gib > max(sizes):
            raise ValidationFailed.one(
                field,
                "host-capacity",
                f"{size_gib} GiB is more than any host's disk holds (largest: {max(sizes):.0f} "
                "GiB); pick a smaller size",
            )

    async def new_volume(
        self,
        name: str,
        *,
        pool: str,
        size_gib: int | None,
        image: str | None,
        full_clone: bool,
        labels: dict[str, str],
        prefix: str = "",
    ) -> tuple[Volume, Pool, Image | None]:
        """A validated, not yet stored volume record (``prefix`` names the body's fields)."""
        pool_obj = await self._pool(pool, f"{prefix}pool")
        image_obj = await self._ready_image(image, f"{prefix}image") if image else None
        if size_gib is None:
            assert image_obj is not None
            disk = image_obj.status.files["disk"]
            size_gib = max(1, math.ceil((disk.virtual_size_bytes or disk.size_bytes) / GIB))
        elif image_obj is not None:
            virtual = image_obj.status.files["disk"].virtual_size_bytes or 0
            if size_gib * GIB < virtual:
                raise ValidationFailed.one(
                    f"{prefix}size_gib",
                    "image-size",
                    f"{size_gib} GiB is smaller than image {image} ({virtual / GIB:.2f} GiB)",
                )
        await self._check_size(size_gib, f"{prefix}size_gib")
        spec = parse(
            VolumeSpec,
            {
                "pool": pool,
                "size_gib": size_gib,
                "image": image,
                "full_clone": full_clone,
                "labels": labels,
            },
        )
        now = utcnow()
        volume = Volume(
            name=name,
            id=new_id(),
            created_at=now,
            updated_at=now,
            spec=spec,
            status=VolumeStatus(message="created on the host of the first vm that uses it"),
        )
        return volume, pool_obj, image_obj

    async def create(self, body: Any) -> Volume:
        """Record a volume; with ``node`` it is made on that host now, else on first use."""
        req = parse(VolumeCreate, body)
        volume, pool, image = await self.new_volume(
            req.name,
            pool=req.pool,
            size_gib=req.size_gib,
            image=req.image,
            full_clone=req.full_clone,
            labels=req.labels,
        )
        if await self.ctx.objects.find(Volume, req.name) is not None:
            raise Conflict(f"volume {req.name!r} already exists; pick another name")
        if req.node is None:
            rev = await self.ctx.store.commit(
                [Objects.put(volume)], [Objects.expect_missing(Volume, volume.name)]
            )
            volume.create_revision = volume.mod_revision = rev
            return volume
        node = await self.ctx.objects.find(Node, req.node)
        if node is None:
            raise ValidationFailed.one(
                "node", "exists", f"no host {req.node!r}; see `corral node ls`"
            )
        if node.status.state != "ready":
            raise Conflict(f"host {req.node} is {node.status.state}; pick a ready host")
        # Recorded first (so the name is taken), as "creating" on the host.
        volume.status = VolumeStatus(state="creating", node=node.name, message="")
        rev = await self.ctx.store.commit(
            [Objects.put(volume)], [Objects.expect_missing(Volume, volume.name)]
        )
        volume.mod_revision = rev
        try:
            answer = await call_host_storage(
                node, {"op": "create", "disk": assigned_disk(volume, pool, image).model_dump()}
            )
        except CorralError:
            await self.ctx.store.commit([Objects.delete(Volume, volume.name)])
            raise
        volume.status = VolumeStatus(
            state="ready",
            node=node.name,
            path=str(answer.get("path")),
            allocated_bytes=answer.get("allocated_bytes"),
        )
        volume.updated_at = utcnow()
        volume.mod_revision = await self.ctx.store.commit([Objects.put(volume)])
        return volume

    async def resize(self, name: str, patch: Any) -> Volume:
        """``PATCH {"size_gib": N}``: grow only (and labels)."""
        if not isinstance(patch, dict) or not set(patch) <= {"size_gib", "labels"} or not patch:
            raise ValidationFailed.one(
                "", "patchable", "a volume's patch may change size_gib (grow only) and labels"
            )
        volume = await self.get(name)
        if volume.status.state == "deleting":
            raise Conflict(f"volume {name!r} is being deleted")
        spec = volume.spec.model_copy(deep=True)
        if "labels" in patch:
            spec = parse(VolumeSpec, {**spec.model_dump(), "labels": patch["labels"] or {}})
        size = patch.get("size_gib", spec.size_gib)
        if not isinstance(size, int) or isinstance(size, bool):
            raise ValidationFailed.one("size_gib", "type", "must be an integer (GiB)")
        if size < volume.spec.size_gib:
            raise ValidationFailed.one(
                "size_gib",
                "grow-only",
                f"volumes only grow: {name} is {volume.spec.size_gib} GiB, {size} would shrink "
                "it and lose data",
            )
        if size > volume.spec.size_gib:
            await self._check_size(size)
            if volume.status.state == "ready" and volume.status.node:
                node = await self.ctx.objects.get(Node, volume.status.node)
                pool = await self.ctx.objects.find(Pool, volume.spec.pool)
                await call_host_storage(
                    node,
                    {
                        "op": "resize",
                        "disk": assigned_disk(volume, pool, None).model_dump(),
                        "size_gib": size,
                        "vm": volume.status.attached_to,
                    },
                )
            spec.size_gib = size
        volume.spec = spec
        volume.updated_at = utcnow()
        volume.mod_revision = await self.ctx.store.commit([Objects.put(volume)])
        return volume

    async def delete(self, name: str) -> Volume:
        """Mark the volume for removal; the leader removes its file, then its record. Refused
        while other volumes read through it (linked clones)."""
        volume = await self.get(name)
        readers = sorted(
            f"{v.name} (vm {v.status.attached_to})" if v.status.attached_to else v.name
            for v in await _all(self.ctx, Volume)
            if v.spec.backing_volume == name and v.status.state != "deleting"
        )
        if readers:
            raise Conflict(
                f"volume {name!r} is the read-only base of linked clones: {', '.join(readers)}; "
                "it goes by itself once they are all deleted"
            )
        if volume.status.attached_to:
            raise Conflict(
                f"volume {name!r} is attached to vm {volume.status.attached_to}; detach it first "
                f"(`corral vm disk detach {volume.status.attached_to} {name}`)"
            )
        if volume.status.state == "deleting":
            return volume
        volume.status.state = "deleting"
        volume.status.message = "removing its file"
        volume.updated_at = utcnow()
        volume.mod_revision = await self.ctx.store.commit(
            [Objects.put(volume)], [Objects.expect_unchanged(volume)]
        )
        return volume

    # -- attach / detach ------------------------------------------------------------------------

    async def attach(self, vm_name: str, volume_name: str, meta: RequestMeta) -> tuple[Vm, Task]:
        """Add the volume to the VM's disks (hot-plugged when it runs); a task tracks it."""
        for _ in range(8):
            vm = await self.ctx.objects.get(Vm, vm_name)
            volume = await self.ctx.objects.find(Volume, volume_name)
            if volume is None:
                raise ValidationFailed.one(
                    "volume", "exists", f"no volume {volume_name!r}; see `corral volume ls`"
                )
            if vm.deleting:
                raise Conflict(f"vm {vm_name!r} is being deleted")
            if any(d.volume == volume_name for d in vm.spec.disks):
                raise Conflict(f"volume {volume_name!r} is already attached to vm {vm_name!r}")
            if volume.status.attached_to and volume.status.attached_to != vm_name:
                raise Conflict(
                    f"volume {volume_name!r} is attached to vm {volume.status.attached_to}; "
                    "a volume is used by one vm at a time"
                )
            if volume.status.state not in ("pending", "ready"):
                raise Conflict(f"volume {volume_name!r} is {volume.status.state}")
            if len(vm.spec.disks) >= MAX_DISKS:
                raise Conflict(f"vm {vm_name!r} already has {MAX_DISKS} disks, the most it can")
            pool = await self.ctx.objects.find(Pool, volume.spec.pool)
            shared = pool is not None and pool.spec.shared
            where = volume.status.node
            if where and not shared and vm.status.node and vm.status.node != where:
                raise Conflict(
                    f"volume {volume_name!r} lives on host {where}'s own disk (pool "
                    f"{volume.spec.pool}) and vm {vm_name!r} runs on {vm.status.node}; use a "
                    "shared pool, or a volume on that host"
                )
            vm.spec.disks.append(VmDisk(volume=volume_name))
            vm.generation += 1
            vm.updated_at = utcnow()
            volume.status.attached_to = vm_name
            volume.updated_at = utcnow()
            task = new_task(
                self.ctx,
                meta,
                "attach-disk",
                vm_name,
                {
                    "generation": vm.generation,
                    "expected_state": vm.spec.power_state,
                    "vm_id": vm.id,
                    "volume": volume_name,
                },
            )
            try:
                rev = await self.ctx.store.commit(
                    [Objects.put(vm), Objects.put(volume), Objects.put(task)],
                    [Objects.expect_unchanged(vm), Objects.expect_unchanged(volume)],
                )
            except Conflict:
                continue
            vm.mod_revision = task.create_revision = task.mod_revision = rev
            return vm, task
        raise Conflict(f"vm {vm_name!r} kept changing; try again")

    async def detach(self, vm_name: str, volume_name: str, meta: RequestMeta) -> tuple[Vm, Task]:
        for _ in range(8):
            vm = await self.ctx.objects.get(Vm, vm_name)
            if not any(d.volume == volume_name for d in vm.spec.disks):
                raise Conflict(f"volume {volume_name!r} is not attached to vm {vm_name!r}")
            vm.spec.disks = [d for d in vm.spec.disks if d.volume != volume_name]
            vm.generation += 1
            vm.updated_at = utcnow()
            ops: list[Put | Delete] = [Objects.put(vm)]
            expect: list[Expect] = [Objects.expect_unchanged(vm)]
            volume = await self.ctx.objects.find(Volume, volume_name)
            if volume is not None and volume.status.attached_to == vm_name:
                volume.status.attached_to = None
                volume.updated_at = utcnow()
                ops.append(Objects.put(volume))
                expect.append(Objects.expect_unchanged(volume))
            task = new_task(
                self.ctx,
                meta,
                "detach-disk",
                vm_name,
                {
                    "generation": vm.generation,
                    "expected_state": vm.spec.power_state,
                    "vm_id": vm.id,
                    "volume": volume_name,
                },
            )
            ops.append(Objects.put(task))
            try:
                rev = await self.ctx.store.commit(ops, expect)
            except Conflict:
                continue
            vm.mod_revision = task.create_revision = task.mod_revision = rev
            return vm, task
        raise Conflict(f"vm {vm_name!r} kept changing; try again")


# -- images -----------------------------------------------------------------------------------


def check_image_url(url: str, *, allow_private: bool = False) -> tuple[str, int]:
    """Refuse URLs corral must never fetch: not https, or a host that resolves to a private,
    loopback, link-local (cloud metadata at 169.254.169.254), multicast or reserved address.
    Returns (host, port). ``allow_private`` (tests, labs) lifts only the address rule."""
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise ValidationFailed.one(
            "source.url", "https", f"must be an https URL, not {parts.scheme or 'none'}://"
        )
    if not parts.hostname:
        raise ValidationFailed.one("source.url", "host", "has no host name")
    if parts.username or parts.password:
        raise ValidationFailed.one("source.url", "no-credentials", "must not carry credentials")
    port = parts.port or 443
    try:
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ValidationFailed.one(
            "source.url", "resolvable", f"cannot resolve {parts.hostname}: {exc}"
        ) from None
    if not allow_private:
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if not address.is_global or address.is_multicast:
                raise ValidationFailed.one(
                    "source.url",
                    "public-address",
                    f"{parts.hostname} resolves to {address}, a private, loopback, link-local or "
                    "reserved address: corral downloads images only from public hosts (copy the "
                    "file here and use `corral image import --file`)",
                )
    return parts.hostname, port


class ImageService:
    """Images: records in etcd; files on the server that received them (``store``)."""

    def __init__(
        self,
        ctx: ServiceContext,
        node: str,
        store: ImageStore | None,
        *,
        max_bytes: int = 20 * GIB,
        allow_private_urls: bool = False,
        spawn: Callable[[Awaitable[None]], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.node = node
        self.store = store
        self.max_bytes = max_bytes
        self.allow_private_urls = allow_private_urls
        self.spawn = spawn

    async def list(self) -> tuple[list[Image], int]:
        page = await self.ctx.objects.list(Image, limit=1000, cursor=None)
        return page.items, page.revision

    async def get(self, name: str) -> Image:
        return await self.ctx.objects.get(Image, name)

    async def create(self, body: Any) -> Image:
        req = parse(ImageCreate, body)
        if req.source is not None:
            check_image_url(req.source.url, allow_private=self.allow_private_urls)
            if self.store is None or self.spawn is None:
                raise Unavailable("this server cannot download images; send it to another one")
        now = utcnow()
        image = Image(name=req.name, id=new_id(), created_at=now, updated_at=now, spec=req.spec())
        if req.source is not None:
            image.status.state = "downloading"
            image.status.message = f"downloading {req.source.url} on {self.node}"
        else:
            missing = image.status.missing(image.spec)
            image.status.message = f"waiting for the upload of: {', '.join(missing)}"
        try:
            rev = await self.ctx.store.commit(
                [Objects.put(image)], [Objects.expect_missing(Image, image.name)]
            )
        except Conflict:
            raise Conflict(f"image {image.name!r} already exists; pick another name") from None
        image.create_revision = image.mod_revision = rev
        if req.source is not None and self.spawn is not None:
            self.spawn(self._download(image))
        return image

    async def upload(
        self,
        name: str,
        file: str,
        chunks: AsyncIterator[bytes],
        *,
        expect_sha256: str | None = None,
    ) -> Image:
        """Store one file of an image on this server; the image is ready once it has all."""
        if file not in IMAGE_FILES:
            raise ValidationFailed.one("file", "one-of", f"must be one of {', '.join(IMAGE_FILES)}")
        image = await self.get(name)
        if image.status.state not in ("uploading", "failed"):
            raise Conflict(
                f"image {name!r} is {image.status.state}; its files cannot change (import it "
                "again under another name)"
            )
        if file != "disk" and image.spec.boot != "direct-kernel":
            raise ValidationFailed.one(
                "file", "boot", f"image {name!r} boots from its disk: it takes no {file}"
            )
        if file == "initrd" and not image.spec.initrd:
            raise ValidationFailed.one(
                "file", "initrd", f"image {name!r} was created without an initrd (initrd: false)"
            )
        if self.store is None:
            raise Unavailable("this host keeps no image files; upload to a server")
        path, sha, size = await self.store.receive_image_file(
            image.name,
            image.id,
            file,
            chunks,
            max_bytes=self.max_bytes,
            expect_sha256=expect_sha256,
        )
        entry = ImageFile(sha256=sha, size_bytes=size, node=self.node)
        if file == "disk":
            try:
                probed = await self.store.probe_image(path)
            except CorralError:
                path.unlink(missing_ok=True)
                raise
            entry.format = probed.format
            entry.virtual_size_bytes = probed.virtual_size_bytes
        return await self._record_file(name, image.id, file, entry)

    async def _record_file(self, name: str, image_id: str, file: str, entry: ImageFile) -> Image:
        for _ in range(8):
            image = await self.get(name)
            if image.id != image_id:
                raise Conflict(f"image {name!r} was replaced during the upload")
            image.status.files[file] = entry
            missing = image.status.missing(image.spec)
            if missing:
                image.status.message = f"waiting for the upload of: {', '.join(missing)}"
            else:
                image.status.state = "ready"
                image.status.message = ""
            image.updated_at = utcnow()
            try:
                image.mod_revision = await self.ctx.store.commit(
                    [Objects.put(image)], [Objects.expect_unchanged(image)]
                )
            except Conflict:
                continue
            return image
        raise Conflict(f"image {name!r} kept changing; try again")

    async def _download(self, image: Image) -> None:
        source = image.spec.source
        assert source is not None and self.store is not None
        try:
            check_image_url(source.url, allow_private=self.allow_private_urls)

            async def chunks() -> AsyncIterator[bytes]:
                async with (
                    httpx.AsyncClient(timeout=60.0, follow_redirects=False) as client,
                    client.stream("GET", source.url) as resp,
                ):
                    if resp.is_redirect:
                        raise ValidationFailed.one(
                            "source.url",
                            "no-redirect",
                            f"the server redirects to {resp.headers.get('location')}; give the "
                            "final URL (redirects are refused)",
                        )
                    if resp.status_code != 200:
                        raise Unavailable(f"{source.url} answered {resp.status_code}")
                    async for chunk in resp.aiter_bytes():
                        yield chunk

            await self.upload(image.name, "disk", chunks(), expect_sha256=source.sha256)
        except (CorralError, httpx.HTTPError, OSError) as exc:
            detail = exc.detail if isinstance(exc, CorralError) else str(exc)
            log.warning("image %s: download failed: %s", image.name, detail)
            current = await self.ctx.objects.find(Image, image.name)
            if current is not None and current.id == image.id:
                current.status.state = "failed"
                current.status.message = f"download failed: {detail}"
                await self.ctx.store.commit([Objects.put(current)])

    async def open_file(self, name: str, file: str) -> tuple[Path | None, str, str]:
        """(the file's path when this host holds it, else None; the host holding it; that
        host's API address)."""
        image = await self.get(name)
        stored = image.status.files.get(file)
        if stored is None:
            raise NotFound(f"image {name!r} has no {file}")
        if stored.node == self.node and self.store is not None:
            path = self.store.open_image_file(image.name, image.id, file)
            if path is None:
                raise NotFound(f"image {name!r}: its {file} is missing on {self.node}")
            return path, stored.node, ""
        holder = await self.ctx.objects.find(Node, stored.node)
        if holder is None:
            raise NotFound(
                f"image {name!r}: host {stored.node}, which holds its {file}, left the cluster; "
                "import the image again"
            )
        return None, stored.node, holder.status.address

    async def delete(self, name: str) -> Image:
        image = await self.get(name)
        users = [
            v.name
            for v in await _all(self.ctx, Volume)
            if v.spec.image == name and not v.spec.full_clone
        ]
        vms = [vm.name for vm in await _all(self.ctx, Vm) if vm.spec.image == name]
        if users or vms:
            names = sorted({*users, *vms})
            raise Conflict(
                f"image {name!r} is used by {', '.join(names[:10])}"
                + (" and more" if len(names) > 10 else "")
                + "; delete those first (linked clones read from it)"
            )
        await self.ctx.store.commit(
            [Objects.delete(Image, name)], [Objects.expect_unchanged(image)]
        )
        if self.store is not None:
            self.store.drop_image(image.name, image.id)
        return image
