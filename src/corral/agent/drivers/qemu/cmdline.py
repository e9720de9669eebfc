"""The ``qemu-system-x86_64`` command line, built only from validated values.

``QemuConfig`` is the whole description of one QEMU process: identity (name, uuid), hardware
(vcpus, memory, machine, accelerator), a boot source, disks and where the run files live.
Constructing one validates every field and raises ``pydantic.ValidationError`` naming the field
and the rule; ``build_argv`` then turns it into an argv list (no shell is ever involved).

How no value can inject an option:

- every string that lands inside a QemuOpts option (``-name``, ``-chardev``) passes through
  ``opt_value``, which doubles commas (QEMU's escape: ``,,`` is a literal comma), and the VM
  name must be a DNS label anyway;
- the options QEMU takes literally (``-kernel``, ``-initrd``, ``-append``, ``-pidfile``) get a
  whole argv element each; kernel and initrd paths must not contain commas all the same,
  because some QEMU machines split ``-initrd`` at commas;
- disks are ``-blockdev`` JSON documents written by ``json.dumps``, with an explicit format
  driver and an explicit ``file`` node, so an image's own header can never choose its format;
- paths must be absolute and free of control characters; unix socket paths must fit in
  ``sun_path`` (107 bytes), which the error says instead of QEMU failing obscurely.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from corral.model.common import DNS_LABEL_RE, NAME_RULE
from corral.model.vm import MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB

__all__ = [
    "MAX_DISKS",
    "SOCKET_PATH_MAX",
    "VNC_BASE_PORT",
    "Accel",
    "DirectKernelBoot",
    "DiskConfig",
    "GuestImage",
    "Machine",
    "QemuConfig",
    "blockdev",
    "build_argv",
    "disk_device",
    "disk_slot",
    "load_guest_image",
    "opt_value",
    "validation_message",
]

Accel = Literal["tcg", "kvm"]
Machine = Literal["q35", "pc"]
DiskFormat = Literal["qcow2", "raw"]

SOCKET_PATH_MAX = 107
"""Longest unix socket path Linux accepts (``sun_path`` is 108 bytes with the final NUL)."""
VNC_BASE_PORT = 5900
"""VNC display N listens on TCP port 5900 + N."""
MAX_DISKS = 16
KERNEL_CMDLINE_MAX = 2047
"""x86 Linux truncates the command line at 2048 bytes with its NUL; refuse rather than cut."""
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def opt_value(value: str) -> str:
    """``value`` escaped for a QemuOpts option (``key=value,...``): commas are doubled, so the
    value can never end the option and start another one."""
    return value.replace(",", ",,")


def _clean_path(path: Path) -> Path:
    text = str(path)
    if not path.is_absolute():
        raise ValueError(f"must be an absolute path, not {text!r}")
    if _CONTROL_RE.search(text):
        raise ValueError(f"must not contain control characters: {text!r}")
    return path


def _no_comma(path: Path) -> Path:
    if "," in str(path):
        raise ValueError(f"must not contain ',' (QEMU may split it there): {str(path)!r}")
    return path


def _regular_file(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not an existing file")
    return path


def _disk_file(path: Path) -> Path:
    if not (path.is_file() or path.is_block_device()):
        raise ValueError(f"{str(path)!r} is not an existing file or block device")
    return path


def _vm_name(name: str) -> str:
    if not DNS_LABEL_RE.match(name):
        raise ValueError(NAME_RULE)
    return name


def _kernel_cmdline(cmdline: str) -> str:
    if _CONTROL_RE.search(cmdline):
        raise ValueError("must not contain control characters")
    if len(cmdline.encode()) > KERNEL_CMDLINE_MAX:
        raise ValueError(f"must be at most {KERNEL_CMDLINE_MAX} bytes")
    return cmdline


_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


def _mac(mac: str) -> str:
    if not _MAC_RE.match(mac):
        raise ValueError(f"must be a MAC address like 52:54:00:12:34:56, not {mac!r}")
    return mac


CleanPath = Annotated[Path, AfterValidator(_clean_path)]
BootFile = Annotated[
    Path, AfterValidator(_clean_path), AfterValidator(_no_comma), AfterValidator(_regular_file)
]
DiskPath = Annotated[Path, AfterValidator(_clean_path), AfterValidator(_disk_file)]


class _Frozen(BaseModel):
    # Not strict: values arrive as JSON from handle files and sidecars (paths and uuids as str).
    model_config = ConfigDict(extra="forbid", frozen=True)


class DirectKernelBoot(_Frozen):
    """Boot a Linux kernel and initrd straight from host files (QEMU's ``-kernel``)."""

    kernel: BootFile
    initrd: BootFile | None = None
    cmdline: Annotated[str, AfterValidator(_kernel_cmdline)] = ""


class DiskConfig(_Frozen):
    """One virtio disk. ``format`` is always explicit: QEMU never probes an image's format.

    ``id`` names the disk for the agent (the volume's name); ``slot`` is the hot-plug port it
    sits on (its QEMU node is ``disk<slot>``, its device ``virtio-disk<slot>``); unset, the
    disk's position in the list.
    """

    path: DiskPath
    format: DiskFormat
    read_only: bool = False
    id: Annotated[str, Field(max_length=63)] = ""
    slot: int | None = Field(default=None, ge=0, lt=MAX_DISKS)


class GuestImage(_Frozen):
    """A bootable image: its disk and how to boot it (see ``load_guest_image``)."""

    disk: DiskConfig
    boot: DirectKernelBoot


def load_guest_image(metadata: Path) -> GuestImage:
    """Read an image's JSON sidecar (``guest/build.sh`` writes ``tiny.json``).

    The sidecar names files relative to its own directory: ``{"boot": "direct-kernel",
    "disk": "tiny.qcow2", "format": "qcow2", "kernel": "vmlinuz", "initrd": "initramfs.gz",
    "cmdline": "console=ttyS0 quiet"}``. Raises ``ValueError`` naming the file and the problem
    (unreadable, not JSON, another boot kind, a missing file).
    """
    try:
        doc = json.loads(Path(metadata).read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("boot") != "direct-kernel":
            raise ValueError(f"boot must be 'direct-kernel', not {doc.get('boot')!r}")
        base = Path(metadata).resolve().parent
        initrd = doc.get("initrd")
        return GuestImage(
            disk=DiskConfig(path=base / str(doc["disk"]), format=doc["format"]),
            boot=DirectKernelBoot(
                kernel=base / str(doc["kernel"]),
                initrd=base / str(initrd) if initrd else None,
                cmdline=str(doc.get("cmdline", "")),
            ),
        )
    except (OSError, KeyError, TypeError, ValueError) as exc:
        detail = validation_message(exc) if isinstance(exc, ValidationError) else str(exc)
        raise ValueError(f"guest image {metadata}: {detail}") from exc


class QemuConfig(_Frozen):
    """Everything one QEMU process is launched with; every field is checked on construction.

    The run files (QMP and serial sockets, console log, pid file) live in ``run_dir``.
    """

    name: Annotated[str, Field(max_length=63), AfterValidator(_vm_name)]
    uuid: uuid.UUID
    vcpus: int = Field(ge=1, le=MAX_VCPUS)
    memory_mib: int = Field(ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB)
    machine: Machine = "q35"
    accel: Accel
    # None: the firmware boots the first disk.
    boot: DirectKernelBoot | None
    disks: tuple[DiskConfig, ...] = Field(default=(), max_length=MAX_DISKS)
    run_dir: CleanPath
    vnc_display: int = Field(ge=0, le=65535 - VNC_BASE_PORT)
    vga: bool = Field(default=True, description="a VGA card, so the VNC console shows a screen")
    # One virtio-net card per MAC, on user-mode networking.
    nics: tuple[Annotated[str, AfterValidator(_mac)], ...] = Field(default=(), max_length=8)

    @model_validator(mode="after")
    def _slots_distinct(self) -> QemuConfig:
        slots = [disk_slot(i, d) for i, d in enumerate(self.disks)]
        if len(set(slots)) != len(slots):
            raise ValueError(f"disks: two disks share a slot ({slots})")
        if self.boot is None and not self.disks:
            raise ValueError("boot: no kernel to boot and no disk to boot from")
        return self

    @model_validator(mode="after")
    def _sockets_fit(self) -> QemuConfig:
        for path in (self.qmp_socket, self.serial_socket):
            if len(str(path).encode()) > SOCKET_PATH_MAX:
                raise ValueError(
                    f"run_dir: socket path {str(path)!r} is longer than {SOCKET_PATH_MAX} bytes "
                    "(the unix socket limit); use a shorter state directory"
                )
        return self

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def serial_socket(self) -> Path:
        return self.run_dir / "serial.sock"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def vnc_port(self) -> int:
        return VNC_BASE_PORT + self.vnc_display


def validation_message(exc: ValidationError) -> str:
    """One line per broken rule, ``field: message`` (pydantic's own text, minus its prefix)."""
    parts: list[str] = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def disk_slot(index: int, disk: DiskConfig) -> int:
    return disk.slot if disk.slot is not None else index


def blockdev(slot: int, disk: DiskConfig) -> dict[str, object]:
    """One disk's block node (``-blockdev`` / QMP ``blockdev-add``): a format node over an
    explicit ``file`` node, so the image's header never picks a format or another file."""
    return {
        "node-name": f"disk{slot}",
        "driver": disk.format,
        "read-only": disk.read_only,
        "file": {"driver": "file", "filename": str(disk.path), "read-only": disk.read_only},
    }


def disk_device(slot: int, machine: Machine, *, bootindex: int | None = None) -> dict[str, str]:
    """The virtio-blk device of the disk in ``slot`` (``-device`` / QMP ``device_add``)."""
    device = {"driver": "virtio-blk-pci", "drive": f"disk{slot}", "id": f"virtio-disk{slot}"}
    if machine == "q35":
        device["bus"] = f"hotplug{slot}"
    if bootindex is not None:
        device["bootindex"] = str(bootindex)
    return device


def _device_opts(device: dict[str, str]) -> str:
    parts = [device["driver"]]
    parts += [f"{k}={opt_value(v)}" for k, v in device.items() if k != "driver"]
    return ",".join(parts)


def build_argv(config: QemuConfig, *, binary: str = "qemu-system-x86_64") -> list[str]:
    """The argv that launches ``config`` as a daemon (``-daemonize``: QEMU's parent exits once
    every socket listens, and the VM runs in its own session, so it outlives the agent).

    ``-no-shutdown`` keeps QEMU alive (status ``shutdown``) after the guest powers off, so the
    driver can tell a guest poweroff from a QEMU that died, and reaps it itself.
    """
    argv = [
        binary,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-name",
        f"guest={opt_value(config.name)},debug-threads=on",
        "-uuid",
        str(config.uuid),
        "-machine",
        f"type={config.machine}",
        "-accel",
        config.accel,
    ]
    if config.accel == "kvm":
        argv += ["-cpu", "host"]
    argv += [
        "-smp",
        f"cpus={config.vcpus}",
        "-m",
        f"size={config.memory_mib}M",
        "-no-shutdown",
        "-msg",
        "timestamp=on",
        "-chardev",
        f"socket,id=qmp,path={opt_value(str(config.qmp_socket))},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"socket,id=serial0,path={opt_value(str(config.serial_socket))},server=on,wait=off,"
        f"logfile={opt_value(str(config.console_log))},logappend=on",
        "-serial",
        "chardev:serial0",
        "-vnc",
        f"127.0.0.1:{config.vnc_display}",
    ]
    if config.vga:
        argv += ["-device", "VGA"]
    if config.machine == "q35":
        # PCIe devices on the root complex cannot be unplugged: every disk gets a root port
        # of its own (``hotplug<slot>``), and the free ones take hot-plugged disks.
        for slot in range(MAX_DISKS):
            argv += [
                "-device",
                f"pcie-root-port,id=hotplug{slot},chassis={slot + 1},bus=pcie.0",
            ]
    if config.boot is not None:
        argv += ["-kernel", str(config.boot.kernel)]
        if config.boot.initrd is not None:
            argv += ["-initrd", str(config.boot.initrd)]
        if config.boot.cmdline:
            argv += ["-append", config.boot.cmdline]
    for index, disk in enumerate(config.disks):
        slot = disk_slot(index, disk)
        bootindex = 1 if config.boot is None and index == 0 else None
        argv += [
            "-blockdev",
            json.dumps(blockdev(slot, disk), separators=(",", ":")),
            "-device",
            _device_opts(disk_device(slot, config.machine, bootindex=bootindex)),
        ]
    for index, mac in enumerate(config.nics):
        argv += [
            "-netdev",
            f"user,id=net{index}",
            "-device",
            f"virtio-net-pci,netdev=net{index},mac={mac},id=nic{index}",
        ]
    argv += ["-pidfile", str(config.pidfile), "-daemonize"]
    return argv
