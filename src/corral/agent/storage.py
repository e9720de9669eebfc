"""This host's part of storage: volume files in ``dir`` pools and the cache of image files.

Everything goes through ``qemu-img`` with an explicit ``-f`` (the format of a file corral made,
or the one probed once when an image was imported), run without a shell and under resource
limits (an image is untrusted input: ``qemu-img info`` on a crafted file must not eat the host).

Layout on a host:

- a volume: ``<pool dir>/<volume>-<id8>.qcow2``, where the pool dir is the pool's ``path`` or
  ``<data-dir>/pools/<pool>``; made under a temporary name and renamed, so a file with the final
  name is always complete;
- an image file: ``<data-dir>/images/<image>-<id8>/<disk|kernel|initrd>``, next to a
  ``<file>.sha256`` marker written once the content was checked; the server that received an
  upload keeps the original there, other hosts fetch a copy from any server the first time a
  VM needs it.

Safety rules (the CVE-2024-32498 class): an imported disk must be raw or qcow2 with no backing
file and no external data file; a linked clone's only backing file is the host's own checked
copy of the image, passed with its format.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import resource
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from corral.errors import CorralError, DriverError, ValidationFailed
from corral.model.assignment import AssignedDisk, AssignedImageFile

__all__ = [
    "IMAGE_PROBE_LIMITS",
    "HostStorage",
    "ImageFetcher",
    "ProbedImage",
    "StorageError",
]

log = logging.getLogger(__name__)

GIB = 1024**3
IMAGE_PROBE_LIMITS = {"address_space": 1 * GIB, "cpu_s": 30}
"""What ``qemu-img`` may use on an untrusted image (OpenStack uses the same kind of cap)."""
_QEMU_IMG_TIMEOUT_S = 600.0
_CHUNK = 1024 * 1024

# Streams an image file from the servers: (image file) -> chunks; raises CorralError.
ImageFetcher = Callable[[AssignedImageFile], AsyncIterator[bytes]]


class StorageError(DriverError):
    """A storage operation failed on this host; the message says what to do."""

    type_slug = "storage"
    title = "Storage error"


@dataclass(frozen=True)
class ProbedImage:
    format: str
    virtual_size_bytes: int


def _limit_resources() -> None:  # runs in the child between fork and exec
    cap = IMAGE_PROBE_LIMITS["address_space"]
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    cpu = IMAGE_PROBE_LIMITS["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))


def _open(path: Path, mode: str) -> BinaryIO:
    """Open a file in binary mode (a file of an image or a volume: reads and writes of it
    go through ``asyncio.to_thread``)."""
    return cast(BinaryIO, open(path, mode))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HostStorage:
    """Volume and image files on this host. ``fetch`` streams an image file from the servers
    (None on a host that is never asked to hold copies, e.g. in tests)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        qemu_img: str = "qemu-img",
        fetch: ImageFetcher | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.qemu_img = qemu_img
        self.fetch = fetch
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    # -- paths --------------------------------------------------------------------------------

    def pool_dir(self, pool: str, path: str | None) -> Path:
        return Path(path) if path else self.data_dir / "pools" / pool

    def volume_path(self, disk: AssignedDisk) -> Path:
        return self.pool_dir(disk.pool, disk.pool_path) / disk.file_name

    def image_dir(self, image: str, image_id: str) -> Path:
        return self.data_dir / "images" / f"{image}-{image_id[:8]}"

    def image_path(self, f: AssignedImageFile) -> Path:
        return self.image_dir(f.image, f.image_id) / f.file

    # -- qemu-img -----------------------------------------------------------------------------

    async def _qemu_img(self, *args: str, limited: bool = False) -> str:
        """Run ``qemu-img ARGS``; its stdout, or StorageError with its own words."""
        try:
            proc = await asyncio.create_subprocess_exec(
                self.qemu_img,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                preexec_fn=_limit_resources if limited else None,
            )
        except OSError as exc:
            raise StorageError(
                f"cannot run {self.qemu_img}: {exc} (install qemu-utils: scripts/host-deps.sh)"
            ) from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(), _QEMU_IMG_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise StorageError(
                f"qemu-img {args[0]} took longer than {_QEMU_IMG_TIMEOUT_S:g} s"
            ) from None
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip() or out.decode(errors="replace").strip()
            raise StorageError(f"qemu-img {args[0]} failed: {text}")
        return out.decode(errors="replace")

    async def info(self, path: Path, fmt: str | None) -> dict[str, Any]:
        """``qemu-img info`` as JSON; ``fmt`` None probes (only ever for a new upload)."""
        args = ["info", "--output=json"]
        if fmt is not None:
            args += ["-f", fmt]
        doc = json.loads(await self._qemu_img(*args, str(path), limited=True))
        if not isinstance(doc, dict):
            raise StorageError(f"qemu-img info {path}: unexpected output")
        return doc

    async def probe_image(self, path: Path) -> ProbedImage:
        """Probe an uploaded disk once and refuse what must never be used as an image:
        formats other than raw and qcow2 (vmdk descriptors, for one, name other files), a
        backing file, an external data file."""
        doc = await self.info(path, None)
        fmt = str(doc.get("format", ""))
        if fmt not in ("raw", "qcow2"):
            raise ValidationFailed.one(
                "disk",
                "format",
                f"the disk is {fmt or 'of an unknown format'}; corral imports raw and qcow2 "
                "disks: convert it first with `qemu-img convert -O qcow2 IN OUT`",
            )
        backing = doc.get("full-backing-filename") or doc.get("backing-filename")
        if backing:
            raise ValidationFailed.one(
                "disk",
                "no-backing-file",
                f"the disk has a backing file ({backing}); corral imports only standalone "
                "disks: flatten it with `qemu-img convert -O qcow2 IN OUT`",
            )
        data = ((doc.get("format-specific") or {}).get("data") or {}).get("data-file")
        if data:
            raise ValidationFailed.one(
                "disk",
                "no-data-file",
                f"the disk keeps its data in an external file ({data}); corral imports only "
                "self-contained disks: convert it with `qemu-img convert -O qcow2 IN OUT`",
            )
        size = doc.get("virtual-size")
        if not isinstance(size, int) or size <= 0:
            raise ValidationFailed.one("disk", "size", "the disk reports no virtual size")
        return ProbedImage(fmt, size)

    # -- image files --------------------------------------------------------------------------

    async def receive_image_file(
        self,
        image: str,
        image_id: str,
        file: str,
        chunks: AsyncIterator[bytes],
        *,
        max_bytes: int,
        expect_sha256: str | None = None,
    ) -> tuple[Path, str, int]:
        """Store an uploaded (or downloaded) image file: (path, sha256, size). The content is
        written to a temporary file, hashed on the way, and renamed only when complete and, with
        ``expect_sha256``, matching. Too big or mismatching: ValidationFailed, nothing kept."""
        target = self.image_dir(image, image_id) / file
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{file}.{secrets.token_hex(4)}.part")
        digest = hashlib.sha256()
        size = 0
        try:
            with _open(tmp, "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise ValidationFailed.one(
                            file,
                            "max-size",
                            f"the {file} is larger than {max_bytes // GIB} GiB, the image size "
                            "cap (CORRAL_IMAGE_MAX_GIB)",
                        )
                    digest.update(chunk)
                    await asyncio.to_thread(fh.write, chunk)
                await asyncio.to_thread(os.fsync, fh.fileno())
            if size == 0:
                raise ValidationFailed.one(file, "not-empty", f"the {file} is empty (0 bytes)")
            sha = digest.hexdigest()
            if expect_sha256 is not None and sha != expect_sha256:
                raise ValidationFailed.one(
                    f"{file}.sha256",
                    "match",
                    f"the {file} has sha256 {sha}, not the expected {expect_sha256}: the "
                    "transfer was corrupted or the source changed; check the checksum and retry",
                )
            os.replace(tmp, target)
            target.with_name(f"{file}.sha256").write_text(sha + "\n")
            return target, sha, size
        finally:
            tmp.unlink(missing_ok=True)

    def open_image_file(self, image: str, image_id: str, file: str) -> Path | None:
        """The checked file of an image held here, or None."""
        path = self.image_dir(image, image_id) / file
        marker = path.with_name(f"{file}.sha256")
        return path if path.is_file() and marker.is_file() else None

    def drop_image(self, image: str, image_id: str) -> None:
        shutil.rmtree(self.image_dir(image, image_id), ignore_errors=True)

    async def image_file(self, f: AssignedImageFile) -> Path:
        """This host's checked copy of an image file, fetched from the servers if needed."""
        path = self.image_path(f)
        marker = path.with_name(f"{f.file}.sha256")
        async with self._lock(str(path)):
            if path.is_file() and marker.is_file() and marker.read_text().strip() == f.sha256:
                return path
            if path.is_file():
                sha = await asyncio.to_thread(_sha256_file, path)
                if sha == f.sha256:
                    marker.write_text(sha + "\n")
                    return path
            if self.fetch is None:
                raise StorageError(
                    f"image {f.image}: its {f.file} is not on this host and this host cannot "
                    "fetch image files"
                )
            log.info("fetching %s of image %s (%d bytes)", f.file, f.image, f.size_bytes)
            try:
                await self.receive_image_file(
                    f.image,
                    f.image_id,
                    f.file,
                    self.fetch(f),
                    max_bytes=max(f.size_bytes, 1),
                    expect_sha256=f.sha256,
                )
            except ValidationFailed as exc:
                raise StorageError(f"image {f.image}: fetching its {f.file}: {exc}") from exc
            except CorralError as exc:
                raise StorageError(
                    f"image {f.image}: cannot fetch its {f.file} from the servers: {exc.detail}"
                ) from exc
            return path

    # -- volumes ------------------------------------------------------------------------------

    def check_capacity(self, disk: AssignedDisk) -> None:
        """Refuse a volume larger than the whole filesystem of its pool on this host."""
        pool_dir = self.pool_dir(disk.pool, disk.pool_path)
        probe = pool_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        total = shutil.disk_usage(probe).total
        if disk.size_gib * GIB > total:
            raise ValidationFailed.one(
                "size_gib",
                "pool-capacity",
                f"{disk.size_gib} GiB is larger than the whole filesystem of pool {disk.pool} on "
                f"this host ({total / GIB:.1f} GiB); pick a smaller size or another pool",
            )

    async def ensure_volume(self, disk: AssignedDisk) -> Path:
        """The volume's file: found, or created now if it was never created anywhere.

        A volume recorded as created (``created_on``) whose file is missing is an error: a
        blank disk must never silently replace lost data.
        """
        path = self.volume_path(disk)
        async with self._lock(str(path)):
            if path.exists():
                return path
            if disk.created_on is not None:
                raise StorageError(
                    f"volume {disk.volume}: its file {path} is missing although it was created "
                    f"on host {disk.created_on}; restore the file (or detach the volume and "
                    "delete it) before starting the VM"
                )
            await self._create(disk, path)
            return path

    async def _create(self, disk: AssignedDisk, path: Path) -> None:
        self.check_capacity(disk)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        size = f"{disk.size_gib}G"
        try:
            if disk.image is None:
                await self._qemu_img("create", "-q", "-f", "qcow2", str(tmp), size)
            else:
                source = await self.image_file(disk.image)
                fmt = disk.image.format or "raw"
                virtual = int((await self.info(source, fmt))["virtual-size"])
                if disk.size_gib * GIB < virtual:
                    raise ValidationFailed.one(
                        "size_gib",
                        "image-size",
                        f"{disk.size_gib} GiB is smaller than image {disk.image.image} "
                        f"({virtual / GIB:.2f} GiB); a disk cannot shrink its image",
                    )
                if disk.full_clone:
                    await self._qemu_img(
                        "convert", "-q", "-f", fmt, "-O", "qcow2", str(source), str(tmp)
                    )
                    await self._qemu_img("resize", "-q", "-f", "qcow2", str(tmp), size)
                else:
                    await self._qemu_img(
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-b",
                        str(source),
                        "-F",
                        fmt,
                        str(tmp),
                        size,
                    )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("created volume %s at %s (%d GiB)", disk.volume, path, disk.size_gib)

    async def resize(self, path: Path, size_gib: int) -> None:
        """Grow a volume that no running VM uses (a running one is grown through QMP)."""
        await self._qemu_img("resize", "-q", "-f", "qcow2", str(path), f"{size_gib}G")

    def delete(self, path: Path) -> bool:
        """Remove a volume's file; False when it was already gone."""
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def allocated_bytes(self, path: Path) -> int | None:
        with contextlib.suppress(OSError):
            return path.stat().st_blocks * 512
        return None


async def stream_file(path: Path, *, chunk: int = _CHUNK) -> AsyncIterator[bytes]:
    """A file's content in chunks, read off the event loop."""
    with _open(path, "rb") as fh:
        while data := await asyncio.to_thread(fh.read, chunk):
            yield data


LocalStorageCall = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
