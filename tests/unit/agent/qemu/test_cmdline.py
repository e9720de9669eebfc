"""The QEMU command line: what each config produces, and that no value can inject an option."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from corral.agent.drivers.qemu.cmdline import (
    MAX_DISKS,
    DirectKernelBoot,
    DiskConfig,
    QemuConfig,
    build_argv,
    load_guest_image,
    opt_value,
    validation_message,
)

VM_UUID = uuid.UUID("6f1c0d4e-8a41-4c1e-9d7e-2b7f3c1a9e01")


def parse_qemu_opts(text: str) -> list[tuple[str, str]]:
    """Split a QemuOpts string the way QEMU does: ``,`` separates options, ``,,`` is a literal
    comma. A part without ``=`` is an implied option and comes back with the key ``""``."""
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    parts.append(current)
    pairs: list[tuple[str, str]] = []
    for part in parts:
        key, eq, value = part.partition("=")
        pairs.append((key, value) if eq else ("", key))
    return pairs


def values_of(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


@pytest.fixture
def boot_files(tmp_path: Path) -> DirectKernelBoot:
    (tmp_path / "vmlinux").write_bytes(b"kernel")
    (tmp_path / "initramfs.gz").write_bytes(b"initrd")
    return DirectKernelBoot(
        kernel=tmp_path / "vmlinux", initrd=tmp_path / "initramfs.gz", cmdline="console=ttyS0"
    )


@pytest.fixture
def make_config(tmp_path: Path, boot_files: DirectKernelBoot) -> Callable[..., QemuConfig]:
    def make(**changes: Any) -> QemuConfig:
        values: dict[str, Any] = {
            "name": "web-1",
            "uuid": VM_UUID,
            "vcpus": 1,
            "memory_mib": 256,
            "accel": "tcg",
            "boot": boot_files,
            "run_dir": tmp_path / "run",
            "vnc_display": 3,
        }
        values.update(changes)
        return QemuConfig(**values)

    return make


def test_base_command_line_is_isolated_daemonized_and_has_every_run_file(
    make_config: Callable[..., QemuConfig], tmp_path: Path
) -> None:
    argv = build_argv(make_config(), binary="/usr/bin/qemu-system-x86_64")
    run = tmp_path / "run"
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-no-shutdown", "-daemonize"):
        assert flag in argv
    assert values_of(argv, "-display") == ["none"]
    assert values_of(argv, "-uuid") == [str(VM_UUID)]
    assert values_of(argv, "-vnc") == ["127.0.0.1:3"]
    assert values_of(argv, "-pidfile") == [str(run / "qemu.pid")]
    assert values_of(argv, "-serial") == ["chardev:serial0"]
    assert values_of(argv, "-mon") == ["chardev=qmp,mode=control"]
    chardevs = [dict(parse_qemu_opts(v)) for v in values_of(argv, "-chardev")]
    assert chardevs == [
        {"": "socket", "id": "qmp", "path": str(run / "qmp.sock"), "server": "on", "wait": "off"},
        {
            "": "socket",
            "id": "serial0",
            "path": str(run / "serial.sock"),
            "server": "on",
            "wait": "off",
            "logfile": str(run / "console.log"),
            "logappend": "on",
        },
    ]


@pytest.mark.parametrize(
    ("changes", "flag", "expected"),
    [
        ({}, "-machine", ["type=q35"]),
        ({"machine": "pc"}, "-machine", ["type=pc"]),
        ({}, "-accel", ["tcg"]),
        ({"accel": "kvm"}, "-accel", ["kvm"]),
        ({}, "-cpu", []),  # TCG keeps QEMU's default model
        ({"accel": "kvm"}, "-cpu", ["host"]),
        ({"vcpus": 4}, "-smp", ["cpus=4"]),
        ({"memory_mib": 1024}, "-m", ["size=1024M"]),
        ({"vnc_display": 0}, "-vnc", ["127.0.0.1:0"]),
        ({"name": "db-7"}, "-name", ["guest=db-7,debug-threads=on"]),
        ({"machine": "pc"}, "-device", ["VGA"]),
        ({"machine": "pc", "vga": False}, "-device", []),
    ],
)
def test_hardware_options(
    make_config: Callable[..., QemuConfig], changes: dict[str, Any], flag: str, expected: list[str]
) -> None:
    assert values_of(build_argv(make_config(**changes)), flag) == expected


def test_direct_kernel_boot_passes_each_file_and_the_cmdline_as_one_argument(
    make_config: Callable[..., QemuConfig], tmp_path: Path
) -> None:
    boot = DirectKernelBoot(
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initramfs.gz",
        cmdline="console=ttyS0,115200 quiet -device evil",
    )
    argv = build_argv(make_config(boot=boot))
    assert values_of(argv, "-kernel") == [str(tmp_path / "vmlinux")]
    assert values_of(argv, "-initrd") == [str(tmp_path / "initramfs.gz")]
    assert values_of(argv, "-append") == ["console=ttyS0,115200 quiet -device evil"]
    # The command line is one argv element: its "-device" is no option of QEMU's.
    assert "evil" not in values_of(argv, "-device")


def test_no_initrd_and_empty_cmdline_leave_their_options_out(
    make_config: Callable[..., QemuConfig], tmp_path: Path
) -> None:
    argv = build_argv(make_config(boot=DirectKernelBoot(kernel=tmp_path / "vmlinux")))
    assert "-initrd" not in argv and "-append" not in argv


def test_disks_are_blockdev_json_with_explicit_format_and_file_nodes(
    make_config: Callable[..., QemuConfig], tmp_path: Path
) -> None:
    qcow = tmp_path / "a,file=x.qcow2"  # a comma is harmless inside JSON
    raw = tmp_path / "b.raw"
    qcow.write_bytes(b"")
    raw.write_bytes(b"")
    disks = (
        DiskConfig(path=qcow, format="qcow2"),
        DiskConfig(path=raw, format="raw", read_only=True),
    )
    argv = build_argv(make_config(disks=disks))
    blockdevs = [json.loads(v) for v in values_of(argv, "-blockdev")]
    assert blockdevs == [
        {
            "node-name": "disk0",
            "driver": "qcow2",
            "read-only": False,
            "file": {"driver": "file", "filename": str(qcow), "read-only": False},
        },
        {
            "node-name": "disk1",
            "driver": "raw",
            "read-only": True,
            "file": {"driver": "file", "filename": str(raw), "read-only": True},
        },
    ]
    devices = [dict(parse_qemu_opts(v)) for v in values_of(argv, "-device")]
    # q35: one PCIe root port per disk slot, so every disk can be unplugged and more plugged.
    ports = [d for d in devices if d[""] == "pcie-root-port"]
    assert [p["id"] for p in ports] == [f"hotplug{i}" for i in range(MAX_DISKS)]
    assert devices[-2:] == [
        {"": "virtio-blk-pci", "drive": "disk0", "id": "virtio-disk0", "bus": "hotplug0"},
        {"": "virtio-blk-pci", "drive": "disk1", "id": "virtio-disk1", "bus": "hotplug1"},
    ]
    # No kernel to boot: the firmware boots the first disk.
    argv = build_argv(make_config(disks=disks, boot=None))
    assert "-kernel" not in argv
    first = dict(parse_qemu_opts(values_of(argv, "-device")[-2]))
    assert first["bootindex"] == "1"


@pytest.mark.parametrize(
    "name",
    [
        "web,file=/etc/passwd",
        "a,b",
        ",",
        "web,,x",
        "-daemonize",
        "Web-1",
        "web 1",
        "web\n1",
        "web/../etc",
        "",
        "x" * 64,
    ],
)
def test_a_name_that_is_no_dns_label_is_refused(
    make_config: Callable[..., QemuConfig], name: str
) -> None:
    with pytest.raises(ValidationError) as err:
        make_config(name=name)
    assert validation_message(err.value).startswith("name: ")


@pytest.mark.parametrize(
    "run_dir",
    ["/tmp/a,file=/etc/passwd", "/tmp/x,,y", "/tmp/ends-with,", "/tmp/server=off,wait=on"],
)
def test_commas_in_run_paths_are_escaped_and_cannot_add_options(
    make_config: Callable[..., QemuConfig], run_dir: str
) -> None:
    argv = build_argv(make_config(run_dir=Path(run_dir)))
    qmp, serial = (dict(parse_qemu_opts(v)) for v in values_of(argv, "-chardev"))
    assert set(qmp) == {"", "id", "path", "server", "wait"}
    assert qmp["path"] == f"{run_dir}/qmp.sock"
    assert (qmp["server"], qmp["wait"]) == ("on", "off")
    assert set(serial) == {"", "id", "path", "server", "wait", "logfile", "logappend"}
    assert serial["logfile"] == f"{run_dir}/console.log"


@pytest.mark.parametrize(
    ("value", "escaped"),
    [("plain", "plain"), ("a,b", "a,,b"), (",,", ",,,,"), ("", "")],
)
def test_opt_value_doubles_commas(value: str, escaped: str) -> None:
    assert opt_value(value) == escaped
    assert parse_qemu_opts(f"x={opt_value(value)}") == [("x", value)]


@pytest.mark.parametrize(
    ("changes", "field", "rule"),
    [
        ({"vcpus": 0}, "vcpus", "greater than or equal to 1"),
        ({"vcpus": 257}, "vcpus", "less than or equal to 256"),
        ({"memory_mib": 63}, "memory_mib", "greater than or equal to 64"),
        ({"machine": "microvm"}, "machine", "'q35' or 'pc'"),
        ({"accel": "hvf"}, "accel", "'tcg' or 'kvm'"),
        ({"vnc_display": -1}, "vnc_display", "greater than or equal to 0"),
        ({"vnc_display": 59636}, "vnc_display", "less than or equal to 59635"),
        ({"run_dir": Path("relative/run")}, "run_dir", "absolute path"),
        ({"run_dir": Path("/tmp/a\nb")}, "run_dir", "control characters"),
        ({"run_dir": Path("/tmp/" + "d" * 100)}, "run_dir", "longer than 107 bytes"),
        ({"uuid": "not-a-uuid"}, "uuid", "UUID"),
        ({"extra_option": "-S"}, "extra_option", "Extra inputs are not permitted"),
    ],
)
def test_bad_config_values_are_refused_naming_field_and_rule(
    make_config: Callable[..., QemuConfig], changes: dict[str, Any], field: str, rule: str
) -> None:
    with pytest.raises(ValidationError) as err:
        make_config(**changes)
    message = validation_message(err.value)
    assert message.startswith(f"{field}: ") or f"{field}: " in message
    assert rule in message


@pytest.mark.parametrize(
    ("kernel_name", "rule"),
    [
        ("vm,linux", "must not contain ','"),
        ("missing", "is not an existing file"),
    ],
)
def test_boot_files_must_exist_and_have_no_comma(
    tmp_path: Path, kernel_name: str, rule: str
) -> None:
    (tmp_path / "vm,linux").write_bytes(b"k")
    with pytest.raises(ValidationError) as err:
        DirectKernelBoot(kernel=tmp_path / kernel_name)
    assert rule in validation_message(err.value)
    assert validation_message(err.value).startswith("kernel: ")


def test_boot_directory_and_relative_paths_and_bad_cmdlines_are_refused(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(b"k")
    with pytest.raises(ValidationError, match="not an existing file"):
        DirectKernelBoot(kernel=tmp_path)
    with pytest.raises(ValidationError, match="absolute path"):
        DirectKernelBoot(kernel=Path("k"))
    with pytest.raises(ValidationError, match="control characters"):
        DirectKernelBoot(kernel=tmp_path / "k", cmdline="quiet\ninit=/bin/sh")
    with pytest.raises(ValidationError, match="at most 2047 bytes"):
        DirectKernelBoot(kernel=tmp_path / "k", cmdline="x" * 2048)


def test_disks_must_exist_have_a_known_format_and_be_few(
    make_config: Callable[..., QemuConfig], tmp_path: Path
) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(b"")
    with pytest.raises(ValidationError, match="not an existing file or block device"):
        DiskConfig(path=tmp_path / "nope.qcow2", format="qcow2")
    with pytest.raises(ValidationError, match="'qcow2' or 'raw'"):
        DiskConfig(path=image, format="vmdk")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="format"):
        DiskConfig.model_validate({"path": str(image)})  # no probing: the format is required
    too_many = tuple(DiskConfig(path=image, format="raw") for _ in range(MAX_DISKS + 1))
    with pytest.raises(ValidationError, match=f"at most {MAX_DISKS} items"):
        make_config(disks=too_many)


def test_guest_image_sidecar_resolves_files_next_to_it(tmp_path: Path) -> None:
    for name in ("vmlinux", "initramfs.gz", "tiny.qcow2"):
        (tmp_path / name).write_bytes(b"x")
    sidecar = tmp_path / "tiny.json"
    sidecar.write_text(
        json.dumps(
            {
                "format": "qcow2",
                "disk": "tiny.qcow2",
                "boot": "direct-kernel",
                "kernel": "vmlinux",
                "initrd": "initramfs.gz",
                "cmdline": "console=ttyS0 quiet",
            }
        )
    )
    image = load_guest_image(sidecar)
    assert image.boot == DirectKernelBoot(
        kernel=tmp_path / "vmlinux", initrd=tmp_path / "initramfs.gz", cmdline="console=ttyS0 quiet"
    )
    assert image.disk == DiskConfig(path=tmp_path / "tiny.qcow2", format="qcow2")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"boot": "bios", "disk": "d", "format": "qcow2", "kernel": "k"}, "boot must be"),
        ({"boot": "direct-kernel", "format": "qcow2", "kernel": "k"}, "'disk'"),
        (
            {"boot": "direct-kernel", "disk": "tiny.qcow2", "format": "qcow2", "kernel": "gone"},
            "kernel: ",
        ),
        ([1, 2], "not a JSON object"),
    ],
)
def test_bad_guest_image_sidecars_name_the_file_and_the_problem(
    tmp_path: Path, doc: object, message: str
) -> None:
    (tmp_path / "tiny.qcow2").write_bytes(b"x")
    sidecar = tmp_path / "tiny.json"
    sidecar.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message) as err:
        load_guest_image(sidecar)
    assert str(sidecar) in str(err.value)
