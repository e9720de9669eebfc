"""NodeAgent end to end over the fake driver and an in-memory NodeService."""

from __future__ import annotations

import asyncio
import builtins
from collections import Counter
from collections.abc import Callable

from corral.agent.drivers.base import DriverVm
from corral.agent.drivers.fake import FakeDriver
from corral.agent.runner import PENDING_HARDWARE_MESSAGE

from .conftest import Harness
from .fakes import FakeNodeService, assignment, eventually

StartAgent = Callable[..., Harness]


def state_of(h: Harness, vm: str) -> str | None:
    obs = h.ns.last(vm)
    return obs.state if obs else None


async def test_three_assigned_vms_end_up_running_at_their_generation(
    start_agent: StartAgent,
) -> None:
    h = start_agent(fake_options={"start_delay_s": 0.01})
    vms = [assignment(f"web-{i}", epoch=3, generation=2) for i in range(3)]
    h.ns.assign(*vms)
    await eventually(lambda: all(state_of(h, a.vm) == "running" for a in vms), "all three running")
    for a in vms:
        obs = h.ns.last(a.vm)
        assert obs is not None
        assert (obs.observed_generation, obs.epoch, obs.vm_id) == (2, 3, a.vm_id)
        assert obs.started_at is not None
        # The user saw it booting before it ran.
        assert h.ns.states(a.vm)[:2] == ["starting", "running"]
        # Progress is reported before the intent counts as applied.
        assert h.ns.reports[h.ns.states(a.vm).index("starting")].observed_generation == 0
    assert [vm.state for vm in await h.driver.list()] == ["running"] * 3
    assert h.ns.registrations[0]["roles"] == ["compute"]


async def test_power_state_stopped_stops_the_vm(start_agent: StartAgent) -> None:
    h = start_agent(fake_options={"stop_delay_s": 0.01})
    h.ns.assign(assignment("web-1"))
    await eventually(lambda: state_of(h, "web-1") == "running", "web-1 running")

    h.ns.assign(assignment("web-1", generation=2, power_state="stopped"))
    await eventually(lambda: state_of(h, "web-1") == "stopped", "web-1 stopped")
    assert h.ns.states("web-1")[-2:] == ["stopping", "stopped"]
    obs = h.ns.last("web-1")
    assert obs is not None and obs.observed_generation == 2 and obs.started_at is None
    vm = await h.driver.inspect("web-1")
    assert vm is not None and vm.state == "stopped"


async def test_reboot_request_changes_started_at(start_agent: StartAgent) -> None:
    h = start_agent()
    h.ns.assign(assignment("web-1"))
    await eventually(lambda: state_of(h, "web-1") == "running", "web-1 running")
    first = h.ns.last("web-1")
    assert first is not None

    h.ns.assign(assignment("web-1", generation=2, reboot_generation=2))
    await eventually(
        lambda: (o := h.ns.last("web-1")) is not None and o.observed_generation == 2,
        "reboot applied",
    )
    after = h.ns.last("web-1")
    assert after is not None and after.state == "running"
    assert after.started_at is not None and first.started_at is not None
    assert after.started_at > first.started_at
    assert "starting" not in h.ns.states("web-1")[1:]  # a reset, not a stop and a boot


async def test_unassigned_vm_is_destroyed_and_reported_gone(start_agent: StartAgent) -> None:
    h = start_agent()
    h.ns.assign(assignment("web-1", epoch=4), assignment("db-1"))
    await eventually(lambda: state_of(h, "web-1") == "running", "web-1 running")

    h.ns.assign(assignment("db-1"))
    await eventually(lambda: h.ns.gone == [("web-1", "id-web-1", 4)], "web-1 reported gone")
    assert await h.driver.inspect("web-1") is None
    assert [vm.name for vm in await h.driver.list()] == ["db-1"]


async def test_gone_report_is_retried_after_the_servers_come_back(
    start_agent: StartAgent,
) -> None:
    ns = FakeNodeService()
    ns.fail_gone = 2
    h = start_agent(ns=ns)
    ns.assign(assignment("web-1"))
    await eventually(lambda: state_of(h, "web-1") == "running", "web-1 running")
    ns.assign()
    await eventually(lambda: ns.gone == [("web-1", "id-web-1", 1)], "web-1 reported gone")
    assert ns.fail_gone == 0


async def test_injected_start_failure_reports_failed_and_other_vms_still_start(
    start_agent: StartAgent,
) -> None:
    h = start_agent(fake_options={"fail_start": "bad-*"}, retry_initial_s=60.0, retry_max_s=60.0)
    h.ns.assign(assignment("bad-1"), assignment("good-1"), assignment("good-2"))
    await eventually(lambda: state_of(h, "bad-1") == "failed", "bad-1 failed")
    await eventually(
        lambda: state_of(h, "good-1") == state_of(h, "good-2") == "running", "good vms running"
    )
    failed = h.ns.last("bad-1")
    assert failed is not None
    assert failed.message == "fake driver: injected start failure for vm bad-1"
    assert failed.observed_generation == 0  # the intent was not applied
    # Passes while backing off do not overwrite the failure with the driver's "stopped".
    await asyncio.sleep(0.15)
    assert state_of(h, "bad-1") == "failed"
    assert "retrying vm bad-1 in" in h.agent.last_pass_summary


async def test_failed_vm_is_retried_at_once_when_its_intent_changes(
    start_agent: StartAgent,
) -> None:
    h = start_agent(fake_options={"fail_start": "web-1"}, retry_initial_s=60.0, retry_max_s=60.0)
    h.ns.assign(assignment("web-1"))
    await eventually(lambda: state_of(h, "web-1") == "failed", "web-1 failed")

    h.driver.fail_start = ""  # the operator fixed the host...
    h.ns.assign(assignment("web-1", generation=2))  # ...and asked to start it again
    await eventually(lambda: state_of(h, "web-1") == "running", "web-1 running")
    obs = h.ns.last("web-1")
    assert obs is not None and obs.observed_generation == 2 and obs.message == ""


async def test_crash_is_reported_then_the_vm_is_started_again(start_agent: StartAgent) -> None:
    h = start_agent()
    h.ns.assign(assignment("web-1"))
    await eventually(lambda: state_of(h, "web-1") == "running", "web-1 running")
    before = h.ns.last("web-1")
    assert before is not None

    h.driver.inject_crash("web-1")
    await eventually(
        lambda: h.ns.states("web-1")[-1:] == ["running"] and "crashed" in h.ns.states("web-1"),
        "crash reported, vm back",
    )
    assert h.ns.states("web-1")[-3:] == ["crashed", "starting", "running"]
    after = h.ns.last("web-1")
    assert after is not None and after.started_at != before.started_at


async def test_assignment_with_an_older_epoch_is_not_acted_on(start_agent: StartAgent) -> None:
    h = start_agent()
    h.ns.assign(assignment("web-1", epoch=3))
    await eventually(lambda: state_of(h, "web-1") == "running", "web-1 running")

    h.ns.assign(assignment("web-1", epoch=2, generation=2, power_state="stopped"))
    await eventually(
        lambda: (
            "ignoring vm web-1 assignment with epoch 2: this node runs epoch 3"
            in h.agent.last_pass_summary
        ),
        "stale assignment ignored",
    )
    vm = await h.driver.inspect("web-1")
    assert vm is not None and vm.state == "running" and vm.epoch == 3


async def test_hardware_change_is_applied_without_restarting_a_running_vm(
    start_agent: StartAgent,
) -> None:
    h = start_agent()
    h.ns.assign(assignment("web-1"))
    await eventually(lambda: state_of(h, "web-1") == "running", "web-1 running")
    before = h.ns.last("web-1")

    h.ns.assign(assignment("web-1", generation=2, memory_mib=1024))
    await eventually(
        lambda: (o := h.ns.last("web-1")) is not None and o.observed_generation == 2,
        "generation 2 applied",
    )
    after = h.ns.last("web-1")
    assert after is not None and before is not None
    assert after.state == "running" and after.started_at == before.started_at
    assert after.message == PENDING_HARDWARE_MESSAGE
    vm = await h.driver.inspect("web-1")
    assert vm is not None and vm.spec.memory_mib == 1024


async def test_agent_restart_reattaches_running_vms_without_restarting_them(
    start_agent: StartAgent,
) -> None:
    first = start_agent()
    first.ns.assign(assignment("web-1"))
    await eventually(lambda: state_of(first, "web-1") == "running", "web-1 running")
    before = first.ns.last("web-1")
    await first.stop()

    second = start_agent()  # same state dir: a restarted agent on the same host
    await eventually(lambda: second.ns.last("web-1") is not None, "recovered vm reported")
    assert second.ns.last("web-1") == before  # reported before any assignment arrived
    second.ns.assign(assignment("web-1"))
    await eventually(lambda: "1 vms as desired" in second.agent.last_pass_summary, "pass ran")
    assert second.ns.states("web-1") == ["running"]  # never "starting": not restarted


async def test_register_failures_are_retried_until_the_servers_answer(
    start_agent: StartAgent,
) -> None:
    ns = FakeNodeService()
    ns.fail_register = 3
    h = start_agent(ns=ns)
    ns.assign(assignment("web-1"))
    await eventually(lambda: state_of(h, "web-1") == "running", "web-1 running")
    assert ns.register_errors == 3
    assert len(ns.registrations) == 1
    assert ns.registrations[0]["inventory"].driver == "fake"
    assert not h.task.done()  # the agent did not crash


async def test_broken_assignment_stream_is_subscribed_again(start_agent: StartAgent) -> None:
    ns = FakeNodeService()
    ns.fail_stream = 2
    h = start_agent(ns=ns)
    ns.assign(assignment("web-1"))
    await eventually(lambda: state_of(h, "web-1") == "running", "web-1 running")
    assert ns.subscriptions == 3


async def test_expired_lease_is_reopened(start_agent: StartAgent) -> None:
    ns = FakeNodeService()
    ns.keepalive_answers = [5, 0]  # the second keepalive finds the lease expired
    h = start_agent(ns=ns)
    await eventually(lambda: len(ns.leases_opened) == 2, "a second lease opened")
    first, second = ns.leases_opened
    await eventually(lambda: ns.keepalives[-1:] == [second], "keepalive on the new lease")
    assert ns.keepalives[:2] == [first, first]
    assert h.agent.lease_id == second


async def test_failed_reports_are_sent_again(start_agent: StartAgent) -> None:
    ns = FakeNodeService()
    ns.fail_report = 3
    h = start_agent(ns=ns)
    ns.assign(assignment("web-1"))
    await eventually(lambda: state_of(h, "web-1") == "running", "running reported")


async def test_shutdown_keeps_vms_running_and_revokes_the_lease_only_when_asked(
    start_agent: StartAgent,
) -> None:
    h = start_agent()
    h.ns.assign(assignment("web-1"))
    await eventually(lambda: state_of(h, "web-1") == "running", "web-1 running")
    await h.stop(revoke_lease=False)
    assert h.ns.revoked == []
    vm = await FakeDriver(h.driver.state_dir).inspect("web-1")
    assert vm is not None and vm.state == "running"

    h2 = start_agent(ns=h.ns)
    await eventually(lambda: h2.agent.lease_id is not None, "lease open")
    lease = h2.agent.lease_id
    await h2.stop(revoke_lease=True)
    assert h.ns.revoked == [lease]
    assert h2.task.done()


class CountingDriver:
    """A fake driver that records how many operations run at once, overall and per VM."""

    name = "fake"

    def __init__(self, inner: FakeDriver) -> None:
        self.inner = inner
        self.now = 0
        self.most = 0
        self.per_vm: Counter[str] = Counter()
        self.overlap_on_one_vm = False

    async def _op(self, name: str, op: Callable[[], object]) -> object:
        self.now += 1
        self.per_vm[name] += 1
        self.most = max(self.most, self.now)
        self.overlap_on_one_vm |= self.per_vm[name] > 1
        try:
            await asyncio.sleep(0.02)
            return await op()  # type: ignore[misc]
        finally:
            self.now -= 1
            self.per_vm[name] -= 1

    def watch(self, callback: Callable[[str], None]) -> None:
        self.inner.watch(callback)

    async def fingerprint(self) -> dict[str, str]:
        return await self.inner.fingerprint()

    async def recover(self) -> builtins.list[DriverVm]:
        return await self.inner.recover()

    async def define(self, vm: DriverVm) -> DriverVm:
        return await self._op(vm.name, lambda: self.inner.define(vm))  # type: ignore[return-value]

    async def start(self, name: str) -> DriverVm:
        return await self._op(name, lambda: self.inner.start(name))  # type: ignore[return-value]

    async def stop(self, name: str, *, force: bool = False, timeout_s: float = 60.0) -> DriverVm:
        return await self._op(  # type: ignore[return-value]
            name, lambda: self.inner.stop(name, force=force, timeout_s=timeout_s)
        )

    async def reboot(self, name: str) -> DriverVm:
        return await self._op(name, lambda: self.inner.reboot(name))  # type: ignore[return-value]

    async def pause(self, name: str) -> DriverVm:
        return await self._op(name, lambda: self.inner.pause(name))  # type: ignore[return-value]

    async def resume(self, name: str) -> DriverVm:
        return await self._op(name, lambda: self.inner.resume(name))  # type: ignore[return-value]

    async def update(self, name: str, vm: DriverVm) -> DriverVm:
        return await self._op(  # type: ignore[return-value]
            name, lambda: self.inner.update(name, vm)
        )

    async def destroy(self, name: str) -> None:
        await self._op(name, lambda: self.inner.destroy(name))

    async def inspect(self, name: str) -> DriverVm | None:
        return await self.inner.inspect(name)

    async def close(self) -> None:
        await self.inner.close()

    async def list(self) -> builtins.list[DriverVm]:
        return await self.inner.list()


async def test_vms_are_worked_on_in_parallel_but_one_operation_per_vm(
    start_agent: StartAgent,
) -> None:
    counting: list[CountingDriver] = []

    def wrap(inner: FakeDriver) -> CountingDriver:
        counting.append(CountingDriver(inner))
        return counting[0]

    h = start_agent(wrap=wrap, max_parallel=3)
    names = [f"web-{i}" for i in range(6)]
    h.ns.assign(*(assignment(n) for n in names))
    await eventually(
        lambda: all(state_of(h, n) == "running" for n in names), "all running", timeout_s=3.0
    )
    # A burst of new desired sets while the VMs are busy must not double up operations.
    for gen in (2, 3, 4):
        h.ns.assign(*(assignment(n, generation=gen, reboot_generation=gen) for n in names))
    await eventually(
        lambda: all((o := h.ns.last(n)) is not None and o.observed_generation == 4 for n in names),
        "generation 4 applied everywhere",
        timeout_s=3.0,
    )
    driver = counting[0]
    assert driver.most == 3  # parallel, bounded by max_parallel
    assert not driver.overlap_on_one_vm
