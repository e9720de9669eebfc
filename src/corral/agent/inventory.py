"""What this host has, measured once when the agent starts (the node inventory)."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path

from corral import __version__
from corral.model.node import HostCpu, Inventory, PoolUsage

__all__ = ["collect_inventory", "cpu_count", "disk_gib", "memory_mib", "pool_usage"]

_MEMINFO = Path("/proc/meminfo")
_GIB = 1024**3


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask), else all online CPUs; at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def memory_mib(meminfo: Path = _MEMINFO) -> int:
    """Total RAM in MiB from ``MemTotal`` of ``meminfo``; falls back to sysconf without /proc.

    Raises OSError only when neither source is available.
    """
    try:
        text = meminfo.read_text(encoding="ascii")
    except OSError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() == "MemTotal":
            value, _, unit = rest.strip().partition(" ")
            if unit.strip().lower() != "kb":
                raise OSError(f"{meminfo}: MemTotal in unexpected unit {unit!r}")
            return int(value) // 1024
    raise OSError(f"{meminfo}: no MemTotal line")


def disk_gib(data_dir: Path) -> tuple[float, float]:
    """(total, free) GiB of the filesystem that holds ``data_dir``, rounded to 0.1.

    ``data_dir`` need not exist yet: its nearest existing ancestor is measured, since that is
    where it will be created.
    """
    path = Path(data_dir).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return round(usage.total / _GIB, 1), round(usage.free / _GIB, 1)


def pool_usage(data_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, PoolUsage]:
    """Every pool directory of this host: ``<data_dir>/pools/<name>`` and the ``extra`` pools
    (name -> path) the host's VMs use elsewhere; with its filesystem and corral's volumes."""
    dirs: dict[str, Path] = {}
    base = Path(data_dir) / "pools"
    if base.is_dir():
        dirs.update({p.name: p for p in sorted(base.iterdir()) if p.is_dir()})
    for name, extra_path in (extra or {}).items():
        dirs[name] = Path(extra_path)
    usage: dict[str, PoolUsage] = {}
    for name, path in dirs.items():
        try:
            fs = shutil.disk_usage(path)
            files = [f for f in path.glob("*.qcow2") if f.is_file()]
            allocated = sum(f.stat().st_blocks * 512 for f in files)
        except OSError:
            continue  # not mounted here (yet): nothing to say about it
        usage[name] = PoolUsage(
            path=str(path),
            total_bytes=fs.total,
            free_bytes=fs.free,
            volumes=len(files),
            allocated_bytes=allocated,
        )
    return usage


def collect_inventory(
    data_dir: Path,
    driver_name: str,
    pools: Mapping[str, str] | None = None,
    cpu: HostCpu | None = None,
) -> Inventory:
    """Measure CPUs, memory, the disk holding ``data_dir``, hostname, kernel, versions and the
    host's storage pools; ``cpu`` is what the driver found guests see under KVM."""
    total, free = disk_gib(data_dir)
    uname = os.uname()
    return Inventory(
        cpus=cpu_count(),
        memory_mib=memory_mib(),
        disk_gib=total,
        disk_free_gib=free,
        hostname=socket.gethostname() or uname.nodename,
        kernel=uname.release,
        corral_version=__version__,
        driver=driver_name,
        pools=pool_usage(data_dir, pools),
        cpu=cpu,
    )
