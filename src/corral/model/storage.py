"""Storage: pools (where disks live), volumes (virtual disks) and images (what disks start from).

A **pool** of driver ``dir`` is a directory on every host (``path``, or the host's
``<data-dir>/pools/<name>`` when unset); ``shared`` says every host sees the same files (NFS,
a cluster filesystem), so a volume in it is usable from any host. A volume in a pool that is not
shared lives on one host (``status.node``) and only VMs on that host can use it.

A **volume** is a qcow2 file made with ``qemu-img`` (format always explicit). It may start as a
linked clone of an image (a qcow2 whose backing file is the host's cached copy of the image) or
as a full copy (``full_clone``). A volume not bound to a host yet (``status.node`` unset, state
``pending``) is created on the host of the first VM that uses it.

An **image** is a disk (raw or qcow2, probed once with ``qemu-img info`` and from then on always
passed explicitly) plus how to boot it: from the disk (``boot: disk``), or a Linux kernel and
initrd declared with it (``boot: direct-kernel``, as the test guest does). Its files are
uploaded to (or downloaded by) one server, checked (sha256, no backing file, no external data
file) and fetched from there by every host that needs them.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from corral.model.common import Labels, Name, ObjectMeta, Strict

__all__ = [
    "BASE_HOLDER",
    "IMAGE_FILES",
    "MAX_VOLUME_GIB",
    "DiskFormat",
    "Image",
    "ImageCreate",
    "ImageFile",
    "ImageFileName",
    "ImageSource",
    "ImageSpec",
    "ImageStatus",
    "Pool",
    "PoolCreate",
    "PoolSpec",
    "PoolStatus",
    "Volume",
    "VolumeCreate",
    "VolumeSpec",
    "VolumeStatus",
    "check_pool_path",
    "check_sha256",
]

DiskFormat = Literal["qcow2", "raw"]
ImageFileName = Literal["disk", "kernel", "initrd"]
IMAGE_FILES: tuple[str, ...] = ("disk", "kernel", "initrd")
MAX_VOLUME_GIB = 64 * 1024
"""qcow2's own limit is far above; no host here has more than this anyway."""
DEFAULT_POOL = "local"
BASE_HOLDER = "linked-clones"
"""``Volume.status.attached_to`` of a frozen base: a VM's old disk file that linked clones (and
the VM itself, now on an overlay) read through. It is read-only and goes by itself once no
volume names it as ``backing_volume`` any more."""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_sha256(value: str) -> str:
    value = value.strip().lower()
    if not _SHA256.match(value):
        raise ValueError("must be 64 hexadecimal digits (the output of `sha256sum FILE`)")
    return value


def check_pool_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, not {value!r}")
    if _CONTROL.search(value) or "," in value:
        raise ValueError("must not contain control characters or ','")
    if any(part == ".." for part in value.split("/")):
        raise ValueError("must not contain '..'")
    if len(value) > 200:
        raise ValueError("must be at most 200 characters")
    return value.rstrip("/") or "/"


Sha256 = Annotated[str, AfterValidator(check_sha256)]
PoolPath = Annotated[str, AfterValidator(check_pool_path)]


# -- pools --------------------------------------------------------------------------------------


class PoolSpec(Strict):
    driver: Literal["dir"] = "dir"
    path: PoolPath | None = Field(
        default=None,
        description="directory on every host; unset: <data-dir>/pools/<name> of each host",
    )
    shared: bool = Field(
        default=False, description="every host sees the same files (NFS, cluster filesystem)"
    )
    labels: Labels = Field(default_factory=dict)


class PoolCreate(PoolSpec):
    name: Name

    def spec(self) -> PoolSpec:
        return PoolSpec.model_validate(self.model_dump(exclude={"name"}))


class PoolStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: Literal["ready"] = "ready"
    message: str = ""


class Pool(ObjectMeta):
    kind: Literal["pool"] = "pool"
    spec: PoolSpec
    status: PoolStatus = Field(default_factory=PoolStatus)


# -- volumes ------------------------------------------------------------------------------------

VolumeState = Literal["pending", "creating", "ready", "failed", "deleting"]


class VolumeSpec(Strict):
    pool: Name = DEFAULT_POOL
    size_gib: int = Field(ge=1, le=MAX_VOLUME_GIB, description="virtual size (thin)")
    format: Literal["qcow2"] = "qcow2"
    image: Name | None = Field(default=None, description="start as a copy of this image")
    full_clone: bool = Field(
        default=False, description="copy the image instead of a linked clone (backing file)"
    )
    labels: Labels = Field(default_factory=dict)
    backing_volume: Name | None = Field(
        default=None,
        description="a linked clone of this read-only volume (a template's, or a frozen base)",
    )


class VolumeCreate(Strict):
    """Body of ``POST /api/v1/volumes``; ``node`` creates it on that host now (else on the host
    of the first VM that uses it)."""

    name: Name
    pool: Name = DEFAULT_POOL
    size_gib: int | None = Field(default=None, ge=1, le=MAX_VOLUME_GIB)
    image: Name | None = None
    full_clone: bool = False
    labels: Labels = Field(default_factory=dict)
    node: Name | None = None

    @model_validator(mode="after")
    def _size_or_image(self) -> VolumeCreate:
        if self.size_gib is None and self.image is None:
            raise ValueError("size_gib: required unless the volume starts from an image")
        return self


class VolumeStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: VolumeState = "pending"
    node: str | None = None
    path: str | None = None
    # The VM whose spec lists this volume (one at a time).
    attached_to: str | None = None
    allocated_bytes: int | None = None
    message: str = ""
    # The file of the volume's active layer in its pool directory, when it is not the first
    # one (``<name>-<id8>.qcow2``): a linked clone of its VM froze that one into a base.
    file_name: str | None = None


class Volume(ObjectMeta):
    kind: Literal["volume"] = "volume"
    spec: VolumeSpec
    status: VolumeStatus = Field(default_factory=VolumeStatus)

    @property
    def file_name(self) -> str:
        """The volume's (active) file in its pool directory (the id keeps a re-used name
        apart)."""
        return self.status.file_name or f"{self.name}-{self.id[:8]}.qcow2"


# -- images -------------------------------------------------------------------------------------

ImageState = Literal["uploading", "downloading", "ready", "failed", "deleting"]


class ImageSource(Strict):
    url: str = Field(max_length=2048, description="https URL of the disk")
    sha256: Sha256 = Field(description="the disk's sha256, checked after download")


class ImageSpec(Strict):
    boot: Literal["disk", "direct-kernel"] = Field(
        default="disk",
        description="disk: the disk has a boot loader; direct-kernel: boot the uploaded "
        "kernel (and initrd) with cmdline",
    )
    cmdline: str = Field(default="", max_length=2047)
    initrd: bool = Field(
        default=False, description="direct-kernel: an initrd is uploaded with the kernel"
    )
    source: ImageSource | None = None
    labels: Labels = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cmdline(self) -> ImageSpec:
        if _CONTROL.search(self.cmdline):
            raise ValueError("cmdline: must not contain control characters")
        if self.cmdline and self.boot != "direct-kernel":
            raise ValueError("cmdline: only with boot 'direct-kernel'")
        if self.initrd and self.boot != "direct-kernel":
            raise ValueError("initrd: only with boot 'direct-kernel'")
        return self


class ImageCreate(ImageSpec):
    name: Name

    def spec(self) -> ImageSpec:
        return ImageSpec.model_validate(self.model_dump(exclude={"name"}))


class ImageFile(BaseModel):
    """One stored file of an image, on the host that received it."""

    model_config = ConfigDict(extra="forbid")

    sha256: str
    size_bytes: int
    node: str
    # The disk only: the format qemu-img probed once, and the disk's virtual size.
    format: DiskFormat | None = None
    virtual_size_bytes: int | None = None


class ImageStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: ImageState = "uploading"
    files: dict[str, ImageFile] = Field(default_factory=dict)
    message: str = ""

    def missing(self, spec: ImageSpec) -> list[str]:
        want = ["disk"]
        if spec.boot == "direct-kernel":
            want += ["kernel", "initrd"] if spec.initrd else ["kernel"]
        return [f for f in want if f not in self.files]


class Image(ObjectMeta):
    kind: Literal["image"] = "image"
    spec: ImageSpec
    status: ImageStatus = Field(default_factory=ImageStatus)
