"""The inventory a host registers with: measured, not configured."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from corral import __version__
from corral.agent.inventory import collect_inventory, memory_mib


def test_inventory_measures_this_host(tmp_path: Path) -> None:
    inv = collect_inventory(tmp_path, "fake")
    usage = shutil.disk_usage(tmp_path)
    assert inv.cpus == len(os.sched_getaffinity(0))
    assert inv.memory_mib == memory_mib()
    assert inv.memory_mib > 0
    assert inv.disk_gib == round(usage.total / 1024**3, 1)
    assert 0 <= inv.disk_free_gib <= inv.disk_gib
    assert inv.kernel == os.uname().release
    assert inv.hostname
    assert (inv.corral_version, inv.driver) == (__version__, "fake")


def test_data_dir_not_created_yet_measures_the_disk_it_will_live_on(tmp_path: Path) -> None:
    inv = collect_inventory(tmp_path / "not" / "yet", "fake")
    assert inv.disk_gib == round(shutil.disk_usage(tmp_path).total / 1024**3, 1)


def test_memory_is_read_from_memtotal_in_mib(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree:   1000 kB\nMemTotal:       24684096 kB\n")
    assert memory_mib(meminfo) == 24105


def test_meminfo_without_memtotal_is_an_error(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree:   1000 kB\n")
    with pytest.raises(OSError, match="no MemTotal line"):
        memory_mib(meminfo)
