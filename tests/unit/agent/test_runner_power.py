"""NodeAgent: pause / resume, restart policies and the crash-loop backoff (fake driver)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .conftest import Harness
from .fakes import assignment, eventually

StartAgent = Callable[..., Harness]


def state_of(h: Harness, vm: str) -> str | None:
    obs = h.ns.last(vm)
    return obs.state if obs else None


def message_of(h: Harness, vm: str) -> str:
    obs = h.ns.last(vm)
    return obs.message if obs else ""


async def running(h: Harness, vm: str = "web-1") -> None:
    await eventually(lambda: state_of(h, vm) == "running", f"{vm} running")


async def test_pause_then_resume_keeps_the_same_boot(start_agent: StartAgent) -> None:
    h = start_agent()
    h.ns.assign(assignment("web-1"))
    await running(h)
    booted = h.ns.last("web-1")
    assert booted is not None

    h.ns.assign(assignment("web-1", generation=2, power_generation=2, power_state="paused"))
    await eventually(lambda: state_of(h, "web-1") == "paused", "web-1 paused")
    paused = h.ns.last("web-1")
    assert paused is not None and paused.observed_generation == 2 and paused.message == ""
    assert paused.started_at == booted.started_at  # frozen, not stopped
    vm = await h.driver.inspect("web-1")
    assert vm is not None and vm.state == "paused"

    h.ns.assign(assignment("web-1", generation=3, power_generation=3))
    await eventually(
        lambda: (o := h.ns.last("web-1")) is not None and o.observed_generation == 3, "resumed"
    )
    resumed = h.ns.last("web-1")
    assert resumed is not None and resumed.state == "running"
    assert resumed.started_at == booted.started_at  # resumed, not booted again
    assert "starting" not in h.ns.states("web-1")[1:]


async def test_a_vm_created_paused_boots_then_pauses(start_agent: StartAgent) -> None:
    h = start_agent()
    h.ns.assign(assignment("web-1", power_state="paused"))
    await eventually(lambda: state_of(h, "web-1") == "paused", "web-1 paused")
    assert h.ns.states("web-1") == ["starting", "paused"]


async def test_policy_never_leaves_a_crashed_vm_down_and_says_how_to_start_it(
    start_agent: StartAgent,
) -> None:
    h = start_agent()
    h.ns.assign(assignment("web-1", restart_policy="never"))
    await running(h)

    h.driver.inject_crash("web-1")
    await eventually(lambda: state_of(h, "web-1") == "crashed", "crash reported")
    assert message_of(h, "web-1") == (
        "fake driver: crashed; not restarted (restart policy never); "
        "start it with `corral vm start web-1`"
    )
    await asyncio.sleep(0.3)  # many passes
    assert h.ns.states("web-1")[-1] == "crashed"
    assert "leaving vm web-1 crashed: restart policy never" in h.agent.last_pass_summary
    vm = await h.driver.inspect("web-1")
    assert vm is not None and vm.state == "crashed"

    # `corral vm start web-1`: a new power request always applies.
    h.ns.assign(assignment("web-1", generation=2, power_generation=2, restart_policy="never"))
    await running(h)
    assert message_of(h, "web-1") == ""


async def test_on_failure_restarts_a_crash_but_not_a_guest_poweroff(
    start_agent: StartAgent,
) -> None:
    h = start_agent()
    h.ns.assign(assignment("web-1"), assignment("db-1"))
    await eventually(lambda: state_of(h, "web-1") == state_of(h, "db-1") == "running", "up")

    h.driver.inject_crash("web-1")
    h.driver.inject_poweroff("db-1")
    await eventually(
        lambda: h.ns.states("web-1")[-3:] == ["crashed", "starting", "running"], "web-1 back"
    )
    assert "fake driver: crashed; restart 1 in 0.05 s (policy on-failure)" in [
        o.message for o in h.ns.reports if o.vm == "web-1" and o.state == "crashed"
    ]
    assert message_of(h, "web-1").startswith("restart 1 at ")
    assert message_of(h, "web-1").endswith(" after: fake driver: crashed (policy on-failure)")

    assert state_of(h, "db-1") == "stopped"
    assert message_of(h, "db-1") == (
        "the guest powered itself off; not restarted (restart policy on-failure restarts only "
        "after a crash); start it with `corral vm start db-1`"
    )
    await asyncio.sleep(0.2)
    assert state_of(h, "db-1") == "stopped"


async def test_always_restarts_a_guest_that_powered_itself_off(start_agent: StartAgent) -> None:
    h = start_agent()
    h.ns.assign(assignment("web-1", restart_policy="always"))
    await running(h)
    h.driver.inject_poweroff("web-1")
    await eventually(
        lambda: h.ns.states("web-1")[-3:] == ["stopped", "starting", "running"], "web-1 back"
    )
    assert message_of(h, "web-1").endswith(" after: the guest powered itself off (policy always)")


async def test_a_crash_loop_backs_off_doubling_up_to_the_maximum(start_agent: StartAgent) -> None:
    h = start_agent(restart_initial_s=0.05, restart_max_s=0.2)
    h.ns.assign(assignment("web-1"))
    await running(h)
    waits: list[str] = []
    for n in range(1, 5):
        h.driver.inject_crash("web-1")
        await eventually(lambda: state_of(h, "web-1") == "crashed", f"crash {n} reported")
        waits.append(message_of(h, "web-1"))
        await running(h)
        assert message_of(h, "web-1").startswith(f"restart {n} at ")
    assert waits == [
        "fake driver: crashed; restart 1 in 0.05 s (policy on-failure)",
        "fake driver: crashed; restart 2 in 0.1 s (policy on-failure)",
        "fake driver: crashed; restart 3 in 0.2 s (policy on-failure)",
        "fake driver: crashed; restart 4 in 0.2 s (policy on-failure)",
    ]


async def test_a_vm_that_ran_long_enough_starts_a_new_streak(start_agent: StartAgent) -> None:
    h = start_agent(restart_initial_s=0.05, restart_reset_s=0.3)
    h.ns.assign(assignment("web-1"))
    await running(h)
    await asyncio.sleep(0.3)  # the passes that follow the start are over
    h.driver.inject_crash("web-1")
    await eventually(lambda: message_of(h, "web-1").startswith("restart 1 at "), "restart 1")
    await asyncio.sleep(0.35)  # it ran longer than restart_reset_s
    await eventually(lambda: message_of(h, "web-1") == "", "the restart note expires")
    h.driver.inject_crash("web-1")
    await eventually(lambda: state_of(h, "web-1") == "crashed", "second crash reported")
    assert message_of(h, "web-1") == "fake driver: crashed; restart 1 in 0.05 s (policy on-failure)"


async def test_a_start_request_skips_the_backoff(start_agent: StartAgent) -> None:
    h = start_agent(restart_initial_s=60.0, restart_max_s=60.0)
    h.ns.assign(assignment("web-1"))
    await running(h)
    await asyncio.sleep(0.3)  # the passes that follow the start are over
    h.driver.inject_crash("web-1")
    await eventually(lambda: state_of(h, "web-1") == "crashed", "crash reported")
    assert message_of(h, "web-1").endswith("restart 1 in 60 s (policy on-failure)")
    await asyncio.sleep(0.2)
    assert state_of(h, "web-1") == "crashed"

    h.ns.assign(assignment("web-1", generation=2, power_generation=2))  # `vm start web-1`
    await running(h)
    assert message_of(h, "web-1") == ""


async def test_changing_the_policy_to_always_restarts_a_held_vm(start_agent: StartAgent) -> None:
    h = start_agent()
    h.ns.assign(assignment("web-1", restart_policy="never"))
    await running(h)
    await asyncio.sleep(0.3)  # the passes that follow the start are over
    h.driver.inject_crash("web-1")
    await eventually(lambda: state_of(h, "web-1") == "crashed", "crash reported")

    # `vm edit --restart-policy always`: a new generation, but no new power request.
    h.ns.assign(assignment("web-1", generation=2, power_generation=1, restart_policy="always"))
    await running(h)
    obs = h.ns.last("web-1")
    assert obs is not None and obs.observed_generation == 2
    assert obs.message.endswith(" after: fake driver: crashed (policy always)")


async def test_a_crash_is_seen_at_once_not_at_the_next_resync(start_agent: StartAgent) -> None:
    # resync every minute: only the driver's event can make the agent look this fast.
    h = start_agent(resync_s=60.0, restart_initial_s=30.0)
    h.ns.assign(assignment("web-1"))
    await running(h)
    await asyncio.sleep(0.3)  # the passes that follow the start are over
    h.driver.inject_crash("web-1")
    await eventually(lambda: state_of(h, "web-1") == "crashed", "the crash reported", timeout_s=1.0)
    assert "restart 1 in" in message_of(h, "web-1")
