"""QEMU processes as the host sees them: launch as a daemon, recognise, wait for, signal.

A QEMU is identified by its pid *and* its command line: ``is_vm_process(pid, uuid)`` is true
only while ``/proc/<pid>/cmdline`` carries ``-uuid <uuid>``, so a pid the kernel has reused for
another process is never mistaken for the VM, and a zombie (its command line is empty) counts as
exited. Signals go through a pidfd opened *before* that check, so the process checked is the
process signalled.

``probe_kvm`` decides whether KVM is usable: QEMU accepting ``-accel kvm -cpu host`` is not
enough (nested KVM on some hosts starts the process and then stalls the guest in the firmware),
so the probe boots the firmware and waits for SeaBIOS to finish POST, within a bound (3 s by
default) that healthy KVM meets easily: a nested KVM that took 9-12 s for POST here also never
got a Linux kernel past its first lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from corral.agent.drivers.qemu.cmdline import opt_value
from corral.agent.drivers.qemu.qmp import QmpSession
from corral.errors import DriverError
from corral.model import HostCpu

__all__ = [
    "expand_host_cpu",
    "is_vm_process",
    "launch",
    "probe_kvm",
    "qemu_version",
    "read_pidfile",
    "signal_vm",
    "wait_exit",
]

_LAUNCH_TIMEOUT_S = 30.0
_POLL_S = 0.05
# SeaBIOS prints one of these on its debug port (0x402) once POST is over and it looks for,
# or hands over to, a boot device.
_POST_DONE = (b"No bootable device", b"Booting from")


def is_vm_process(pid: int | None, vm_uuid: str) -> bool:
    """True while ``pid`` is a live process whose argv holds ``-uuid vm_uuid``."""
    if pid is None or pid <= 0:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    needle = vm_uuid.encode()
    return any(a == b"-uuid" and b == needle for a, b in itertools.pairwise(argv))


def signal_vm(pid: int | None, vm_uuid: str, sig: signal.Signals) -> bool:
    """Send ``sig`` to the VM's QEMU; False (and nothing sent) when it is not that QEMU."""
    if pid is None or pid <= 0:
        return False
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError as exc:
        raise DriverError(f"qemu: cannot open pid {pid}: {exc}") from exc
    try:
        if not is_vm_process(pid, vm_uuid):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    except OSError as exc:
        raise DriverError(f"qemu: cannot signal pid {pid}: {exc}") from exc
    finally:
        os.close(fd)


async def wait_exit(pid: int | None, vm_uuid: str, timeout_s: float) -> bool:
    """Wait until the VM's QEMU is gone; True if it went within ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while is_vm_process(pid, vm_uuid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)
    return True


async def launch(argv: Sequence[str], *, pidfile: Path, log: Path, label: str) -> int:
    """Run a ``-daemonize`` argv and return the daemon's pid.

    QEMU's parent exits 0 once the VM is initialised and every socket listens; on failure it
    exits non-zero after printing why, which becomes the DriverError's message. What QEMU prints
    at start-up is appended to ``log`` (the daemon's own stderr goes to /dev/null).
    """
    _unlink(pidfile)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise DriverError(f"qemu {label}: cannot run {argv[0]}: {exc}") from exc
    try:
        _, err = await asyncio.wait_for(proc.communicate(), _LAUNCH_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise DriverError(
            f"qemu {label}: did not finish starting within {_LAUNCH_TIMEOUT_S:g} s"
        ) from None
    text = err.decode(errors="replace").strip()
    if text:
        _append_log(log, text)
    if proc.returncode != 0:
        raise DriverError(f"qemu {label}: failed to start (exit {proc.returncode}): {text}")
    return _read_pid(pidfile, label)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _append_log(log: Path, text: str) -> None:
    with contextlib.suppress(OSError), log.open("a", encoding="utf-8") as fh:
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} start: {text}\n")


def _read_pid(pidfile: Path, label: str) -> int:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError) as exc:
        raise DriverError(f"qemu {label}: started but its pid file {pidfile}: {exc}") from exc


def read_pidfile(pidfile: Path) -> int | None:
    """The pid in a QEMU pid file, or None when there is none (QEMU removes it on exit)."""
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _kvm_device_problem() -> str | None:
    """Why /dev/kvm cannot be used by this process, or None when it can be opened."""
    dev = Path("/dev/kvm")
    if not dev.exists():
        return "no /dev/kvm"
    if not os.access(dev, os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def _post_done(firmware_log: Path) -> bool:
    try:
        text = firmware_log.read_bytes()
    except OSError:
        return False
    return any(marker in text for marker in _POST_DONE)


async def qemu_version(binary: str) -> str:
    """``major.minor.micro`` from ``BINARY --version``; DriverError when it cannot be run."""
    try:
        proc = await asyncio.create_subprocess_exec(
            binary,
            "--version",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 10.0)
    except (OSError, TimeoutError) as exc:
        raise DriverError(f"qemu: cannot run {binary} --version: {exc}") from exc
    match = re.search(rb"version (\d+\.\d+\.\d+)", out)
    if proc.returncode != 0 or match is None:
        raise DriverError(f"qemu: {binary} --version said {out.decode(errors='replace')!r}")
    return match.group(1).decode()


async def probe_kvm(binary: str, timeout_s: float) -> tuple[bool, str]:
    """Whether KVM with ``-cpu host`` can run a guest here, and a sentence saying why.

    Boots the firmware (no disk) under ``-accel kvm -cpu host`` with SeaBIOS's debug port
    logged to a file, and passes when POST finishes within ``timeout_s``. The probe QEMU is
    killed before this returns.
    """
    problem = _kvm_device_problem()
    if problem is not None:
        return False, problem
    marker = str(uuid.uuid4())
    with tempfile.TemporaryDirectory(prefix="corral-kvm-probe-") as tmp:
        firmware_log, pidfile = Path(tmp) / "firmware.log", Path(tmp) / "qemu.pid"
        argv = [
            binary,
            *("-nodefaults", "-no-user-config", "-display", "none", "-uuid", marker),
            *("-machine", "type=q35", "-accel", "kvm", "-cpu", "host", "-m", "size=64M"),
            *("-chardev", f"file,id=fw,path={opt_value(str(firmware_log))}"),
            *("-device", "isa-debugcon,iobase=0x402,chardev=fw"),
            *("-pidfile", str(pidfile), "-daemonize"),
        ]
        started = time.monotonic()
        try:
            pid = await launch(argv, pidfile=pidfile, log=Path(tmp) / "qemu.log", label="probe")
        except DriverError as exc:
            return False, f"qemu cannot start with -accel kvm -cpu host: {exc}"
        try:
            while time.monotonic() - started < timeout_s:
                if _post_done(firmware_log):
                    took = time.monotonic() - started
                    return True, f"the firmware finished POST under KVM in {took:.2f} s"
                if not is_vm_process(pid, marker):
                    return False, "qemu exited while booting the firmware under KVM"
                await asyncio.sleep(_POLL_S)
            return False, (
                f"the firmware did not finish POST under KVM within {timeout_s:g} s, which "
                "healthy KVM does in well under a second and TCG in about two (nested KVM that "
                "stalls guests?)"
            )
        finally:
            signal_vm(pid, marker, signal.SIGKILL)
            await wait_exit(pid, marker, 5.0)


async def expand_host_cpu(binary: str) -> HostCpu:
    """The CPU a ``-accel kvm -cpu host`` guest sees here: QEMU's full expansion of model
    ``host`` (vendor, model name, every feature that is on), asked of a machine-less QEMU."""
    marker = str(uuid.uuid4())
    with tempfile.TemporaryDirectory(prefix="corral-cpu-probe-") as tmp:
        sock, pidfile = Path(tmp) / "qmp.sock", Path(tmp) / "qemu.pid"
        argv = [
            binary,
            *("-nodefaults", "-no-user-config", "-display", "none", "-uuid", marker),
            *("-machine", "none", "-accel", "kvm"),
            *("-qmp", f"unix:{opt_value(str(sock))},server=on,wait=off"),
            *("-pidfile", str(pidfile), "-daemonize"),
        ]
        pid = await launch(argv, pidfile=pidfile, log=Path(tmp) / "qemu.log", label="cpu-probe")
        try:
            session = await QmpSession.connect(sock, label="cpu-probe")
            try:
                reply = await session.execute(
                    "query-cpu-model-expansion", {"type": "full", "model": {"name": "host"}}
                )
            finally:
                await session.close()
        finally:
            signal_vm(pid, marker, signal.SIGKILL)
            await wait_exit(pid, marker, 5.0)
    try:
        props = reply["model"]["props"]  # type: ignore[index]
        return HostCpu(
            vendor=str(props.get("vendor", "")),
            model=str(props.get("model-id", "")).strip(),
            # QEMU lists some features twice (kvm_asyncpf and kvm-asyncpf): one spelling.
            features=sorted({k.replace("_", "-") for k, v in props.items() if v is True}),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise DriverError(f"qemu cpu-probe: query-cpu-model-expansion returned {reply!r}") from exc
