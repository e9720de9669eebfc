"""The fake driver's live migration: two hosts' drivers, a real TCP socket between them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.agent.drivers import FakeDriver
from corral.agent.drivers.base import DriverVm
from corral.agent.drivers.fake_migration import FakeMigrator
from corral.model import VmSpec
from corral.model.migration import IncomingMigration, MigrationReport, OutgoingMigration


def _vm() -> DriverVm:
    return DriverVm(
        name="web-1", vm_id="id-1", epoch=1, spec=VmSpec(memory_mib=256), state="stopped"
    )


_OPEN: list[FakeMigrator] = []


@pytest.fixture(autouse=True)
def _close_listeners() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


async def _hosts(tmp_path: Path, delay_s: float = 0.0) -> tuple[FakeMigrator, FakeMigrator]:
    src = FakeDriver(tmp_path / "src")
    dst = FakeDriver(tmp_path / "dst")
    await src.define(_vm())
    await src.start("web-1")
    await dst.define(_vm())  # the agent defines the VM before the incoming migration
    pair = FakeMigrator(src, transfer_delay_s=delay_s), FakeMigrator(dst)
    _OPEN.extend(pair)
    return pair


async def _listen(dst: FakeMigrator) -> MigrationReport:
    inc = IncomingMigration(id="m1", source="n1")
    return await dst.start_incoming("web-1", inc, "127.0.0.1")


def _out(uri: str) -> OutgoingMigration:
    return OutgoingMigration(id="m1", target="n2", uri=uri)


async def test_guest_moves_with_the_same_boot_and_progress(tmp_path: Path) -> None:
    src, dst = await _hosts(tmp_path, delay_s=0.4)
    before = await src.driver.inspect("web-1")
    assert before is not None and before.started_at is not None
    listening = await _listen(dst)
    assert listening.status == "listening" and listening.uri is not None
    assert listening.uri.startswith("tcp:127.0.0.1:")

    reports = [r async for r in src.outgoing("web-1", _out(listening.uri), set())]

    assert reports[-1].status == "completed", reports[-1]
    active = [r for r in reports if r.status == "active"]
    assert active and active[-1].transferred_bytes > active[0].transferred_bytes
    assert all(r.total_bytes > 0 for r in active[1:])
    assert reports[-1].downtime_ms is not None and reports[-1].total_time_ms is not None
    after = await dst.driver.inspect("web-1")
    assert after is not None and after.state == "running"
    assert after.started_at == before.started_at  # not restarted
    assert after.spec.memory_mib == 256
    left = await src.driver.inspect("web-1")
    assert left is not None and left.state == "stopped" and "migrated to n2" in left.message
    assert (await dst.incoming_report("web-1", "m1")).status == "completed"
    # A late cancel says it is too late: the guest runs on the target.
    assert (await src.cancel_outgoing("web-1", "m1")).status == "completed"


async def test_cancel_mid_transfer_keeps_the_guest_on_the_source(tmp_path: Path) -> None:
    src, dst = await _hosts(tmp_path, delay_s=5.0)
    listening = await _listen(dst)
    assert listening.uri is not None
    stream = src.outgoing("web-1", _out(listening.uri), set())
    first = await anext(stream)
    assert first.status == "active"
    await stream.aclose()  # the agent's worker is replaced by a cancel worker

    cancelled = await src.cancel_outgoing("web-1", "m1")

    assert cancelled.status == "cancelled"
    here = await src.driver.inspect("web-1")
    assert here is not None and here.state == "running"
    there = await dst.driver.inspect("web-1")
    assert there is not None and there.state == "stopped"  # never ran on the target
    assert src.marker("web-1") is None


async def test_target_refuses_another_migration_and_a_dead_listener_fails(
    tmp_path: Path,
) -> None:
    src, dst = await _hosts(tmp_path)
    listening = await _listen(dst)
    assert listening.uri is not None
    wrong = OutgoingMigration(id="other", target="n2", uri=listening.uri)
    reports = [r async for r in src.outgoing("web-1", wrong, set())]
    assert reports[-1].status == "failed"
    assert "expected migration m1" in reports[-1].message
    here = await src.driver.inspect("web-1")
    assert here is not None and here.state == "running"

    restarted = FakeMigrator(dst.driver)  # an agent restart loses the listener
    found = restarted.marker("web-1")  # but not the marker on disk
    assert found is not None and (found.id, found.role) == ("m1", "target")
    report = await restarted.incoming_report("web-1", "m1")
    assert report.status == "failed" and "listener is gone" in report.message


async def test_unreachable_target_fails_cleanly(tmp_path: Path) -> None:
    src, _ = await _hosts(tmp_path)
    reports = [r async for r in src.outgoing("web-1", _out("tcp:127.0.0.1:1"), set())]
    assert reports[-1].status == "failed"
    assert "cannot reach the target" in reports[-1].message
    with pytest.raises(Exception, match="uri"):
        [r async for r in src.outgoing("web-1", _out("unix:/x"), set())]
