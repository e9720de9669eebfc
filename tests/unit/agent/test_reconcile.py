"""diff_vms and plan_actions: what the agent decides to do for each VM, table by table."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from corral.agent.drivers.base import DriverVm, RuntimeState
from corral.agent.reconcile import diff_vms, plan_actions
from corral.model import Assignment

from .fakes import assignment

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def vm_here(
    a: Assignment, *, state: RuntimeState = "running", applied: int | None = None, **kw: object
) -> DriverVm:
    """The VM as the driver holds it after ``a`` was fully applied (then changed by ``kw``)."""
    vm = DriverVm(
        name=a.vm,
        vm_id=a.vm_id,
        epoch=a.epoch,
        spec=a.spec.model_copy(deep=True),
        state=state,
        started_at=T0 if state == "running" else None,
        applied_generation=a.generation if applied is None else applied,
        reboot_generation=a.reboot_generation,
    )
    return replace(vm, **kw)  # type: ignore[arg-type]


WEB = assignment("web-1", epoch=3, generation=2)
# Started at generation 2 (its last power request), then its labels changed at 3 and 4.
NEVER = assignment("web-1", epoch=3, generation=4, power_generation=2, restart_policy="never")
ALWAYS = assignment("web-1", epoch=3, generation=4, power_generation=2, restart_policy="always")
PAUSED = assignment("web-1", epoch=3, generation=3, power_state="paused")

# (case, desired assignment or None, VM on this host or None, expected category)
CASES: list[tuple[str, Assignment | None, DriverVm | None, str]] = [
    ("new assignment", WEB, None, "added"),
    ("unassigned vm", None, vm_here(WEB), "removed"),
    ("as desired", WEB, vm_here(WEB), "unchanged"),
    ("stopped, a start not yet applied", WEB, vm_here(WEB, state="stopped", applied=1), "updated"),
    ("crashed but wanted running", WEB, vm_here(WEB, state="crashed"), "updated"),
    (
        "running but wanted stopped",
        assignment("web-1", epoch=3, generation=3, power_state="stopped"),
        vm_here(WEB),
        "updated",
    ),
    ("generation newer than applied", WEB, vm_here(WEB, applied=1), "updated"),
    (
        "reboot requested",
        assignment("web-1", epoch=3, generation=3, reboot_generation=3),
        vm_here(WEB),
        "updated",
    ),
    ("paused as desired", PAUSED, vm_here(PAUSED, state="paused"), "unchanged"),
    ("paused but wanted running", WEB, vm_here(WEB, state="paused"), "updated"),
    ("running but wanted paused", PAUSED, vm_here(WEB), "updated"),
    ("crashed, policy never", NEVER, vm_here(NEVER, state="crashed"), "held"),
    ("crashed, policy on-failure", WEB, vm_here(WEB, state="crashed"), "updated"),
    (
        "guest powered off, policy on-failure",
        WEB,
        vm_here(WEB, state="stopped", message="the guest powered itself off"),
        "held",
    ),
    ("guest powered off, policy always", ALWAYS, vm_here(ALWAYS, state="stopped"), "updated"),
    (
        "crashed, policy never, then started again (a new power request)",
        assignment("web-1", epoch=3, generation=5, power_generation=5, restart_policy="never"),
        vm_here(NEVER, state="crashed"),
        "updated",
    ),
    (
        "crashed, policy never, then its labels changed",
        assignment(
            "web-1",
            epoch=3,
            generation=5,
            power_generation=2,
            restart_policy="never",
            labels={"tier": "web"},
        ),
        vm_here(NEVER, state="crashed"),
        "updated",
    ),
    (
        "crashed, policy never, placed here again",
        assignment("web-1", epoch=4, generation=4, power_generation=2, restart_policy="never"),
        vm_here(NEVER, state="crashed"),
        "updated",
    ),
    (
        "stopped before its first start was applied",
        assignment("web-1", epoch=3, generation=1, power_generation=1),
        vm_here(assignment("web-1", epoch=3, generation=1), state="stopped", applied=0),
        "updated",
    ),
    (
        "epoch newer (placed here again)",
        assignment("web-1", epoch=4, generation=2),
        vm_here(WEB),
        "updated",
    ),
    (
        "epoch older than the one running here",
        assignment("web-1", epoch=2, generation=2),
        vm_here(WEB),
        "ignored",
    ),
    (
        "generation older than applied",
        assignment("web-1", epoch=3, generation=1),
        vm_here(WEB),
        "ignored",
    ),
    (
        "same name, new vm id",
        assignment("web-1", vm_id="id-new", epoch=1),
        vm_here(WEB),
        "replaced",
    ),
]


@pytest.mark.parametrize(
    ("desired", "actual", "category"),
    [pytest.param(d, a, c, id=case) for case, d, a, c in CASES],
)
def test_diff_vms_classifies_each_vm(
    desired: Assignment | None, actual: DriverVm | None, category: str
) -> None:
    diff = diff_vms({"web-1": desired} if desired else {}, {"web-1": actual} if actual else {})
    found = {
        name: getattr(diff, name)
        for name in ("added", "removed", "replaced", "updated", "unchanged", "ignored", "held")
        if getattr(diff, name)
    }
    assert list(found) == [category]
    assert len(found[category]) == 1


def test_stale_epoch_is_ignored_with_a_reason_naming_both_epochs() -> None:
    diff = diff_vms({"web-1": assignment("web-1", epoch=2)}, {"web-1": vm_here(WEB)})
    assert diff.ignored[0].reason == (
        "ignoring vm web-1 assignment with epoch 2: this node runs epoch 3"
    )
    assert plan_actions(diff) == []


def test_diff_handles_many_vms_at_once_sorted_by_name() -> None:
    a, b, c = (assignment(n) for n in ("a-1", "b-1", "c-1"))
    diff = diff_vms(
        {"a-1": a, "c-1": c}, {"b-1": vm_here(b), "c-1": vm_here(c, state="stopped", applied=0)}
    )
    assert [x.vm for x in diff.added] == ["a-1"]
    assert [x.name for x in diff.removed] == ["b-1"]
    assert [u.assignment.vm for u in diff.updated] == ["c-1"]
    assert [p.vm for p in plan_actions(diff)] == ["a-1", "b-1", "c-1"]


# (case, desired, on host, expected steps, expected sentence)
PLANS: list[tuple[str, Assignment | None, DriverVm | None, tuple[str, ...], str]] = [
    (
        "new running vm",
        WEB,
        None,
        ("define", "start", "record"),
        "defining and starting vm web-1 (epoch 3, generation 2)",
    ),
    (
        "new stopped vm",
        assignment("web-1", epoch=3, generation=2, power_state="stopped"),
        None,
        ("define", "record"),
        "defining vm web-1 (epoch 3, generation 2)",
    ),
    (
        "unassigned",
        None,
        vm_here(WEB),
        ("destroy",),
        "destroying vm web-1 (epoch 3): no longer assigned to this node",
    ),
    (
        "start a stopped vm",
        assignment("web-1", epoch=3, generation=3),
        vm_here(WEB, state="stopped"),
        ("start", "record"),
        "starting vm web-1 (epoch 3, generation 3)",
    ),
    (
        "restart a crashed vm",
        WEB,
        vm_here(WEB, state="crashed"),
        ("start", "record"),
        "starting vm web-1 (epoch 3, generation 2) after it crashed (restart policy on-failure)",
    ),
    (
        "restart a guest that powered itself off, policy always",
        ALWAYS,
        vm_here(ALWAYS, state="stopped"),
        ("start", "record"),
        "starting vm web-1 (epoch 3, generation 4) after it powered itself off "
        "(restart policy always)",
    ),
    (
        "start a crashed vm whose policy is never: a new power request",
        assignment("web-1", epoch=3, generation=5, power_generation=5, restart_policy="never"),
        vm_here(NEVER, state="crashed"),
        ("start", "record"),
        "starting vm web-1 (epoch 3, generation 5) after it crashed",
    ),
    (
        "labels of a crashed vm whose policy is never change: recorded, not started",
        assignment(
            "web-1",
            epoch=3,
            generation=5,
            power_generation=2,
            restart_policy="never",
            labels={"tier": "web"},
        ),
        vm_here(NEVER, state="crashed"),
        ("update", "record"),
        "updating vm web-1 (epoch 3, generation 5)",
    ),
    (
        "pause a running vm",
        PAUSED,
        vm_here(WEB),
        ("update", "pause", "record"),
        "updating and pausing vm web-1 (epoch 3, generation 3)",
    ),
    (
        "resume a paused vm",
        assignment("web-1", epoch=3, generation=4),
        vm_here(PAUSED, state="paused"),
        ("update", "resume", "record"),
        "updating and resuming vm web-1 (epoch 3, generation 4)",
    ),
    (
        "new paused vm",
        PAUSED,
        None,
        ("define", "start", "pause", "record"),
        "defining and starting and pausing vm web-1 (epoch 3, generation 3)",
    ),
    (
        "paused vm found stopped (a new power request)",
        PAUSED,
        vm_here(PAUSED, state="stopped", applied=2),
        ("start", "pause", "record"),
        "starting and pausing vm web-1 (epoch 3, generation 3)",
    ),
    (
        "stop a paused vm",
        assignment("web-1", epoch=3, generation=4, power_state="stopped"),
        vm_here(PAUSED, state="paused"),
        ("update", "stop", "record"),
        "updating and stopping vm web-1 (epoch 3, generation 4)",
    ),
    (
        "stop",
        assignment("web-1", epoch=3, generation=3, power_state="stopped"),
        vm_here(WEB),
        ("update", "stop", "record"),
        "updating and stopping vm web-1 (epoch 3, generation 3)",
    ),
    (
        "reboot a running vm",
        assignment("web-1", epoch=3, generation=3, reboot_generation=3),
        vm_here(WEB),
        ("reboot", "record"),
        "rebooting vm web-1 (epoch 3, generation 3)",
    ),
    (
        "reboot request for a stopped vm only boots it",
        assignment("web-1", epoch=3, generation=3, reboot_generation=3),
        vm_here(WEB, state="stopped"),
        ("start", "record"),
        "starting vm web-1 (epoch 3, generation 3)",
    ),
    (
        "reboot request for a vm kept off does nothing but record",
        assignment("web-1", epoch=3, generation=3, reboot_generation=3, power_state="stopped"),
        vm_here(assignment("web-1", epoch=3, generation=2, power_state="stopped"), state="stopped"),
        ("record",),
        "recording generation 3 as applied for vm web-1 (epoch 3)",
    ),
    (
        "memory change",
        assignment("web-1", epoch=3, generation=3, memory_mib=1024),
        vm_here(WEB),
        ("update", "record"),
        "updating vm web-1 (epoch 3, generation 3)",
    ),
    (
        "placed here again",
        assignment("web-1", epoch=4, generation=2),
        vm_here(WEB),
        ("update", "record"),
        "updating vm web-1 (epoch 4, generation 2)",
    ),
    (
        "new vm under an old name",
        assignment("web-1", vm_id="id-new", epoch=1),
        vm_here(WEB),
        ("destroy", "define", "start", "record"),
        "replacing vm web-1 (id id-web-1 -> id-new): "
        "defining and starting vm web-1 (epoch 1, generation 1)",
    ),
]


@pytest.mark.parametrize(
    ("desired", "actual", "steps", "sentence"),
    [pytest.param(d, a, s, t, id=case) for case, d, a, s, t in PLANS],
)
def test_plan_actions_steps_and_sentence(
    desired: Assignment | None, actual: DriverVm | None, steps: tuple[str, ...], sentence: str
) -> None:
    diff = diff_vms({"web-1": desired} if desired else {}, {"web-1": actual} if actual else {})
    [plan] = plan_actions(diff)
    assert plan.steps == steps
    assert plan.sentence == sentence
    # applied_generation may only advance once everything else succeeded.
    if plan.assignment is not None:
        assert plan.steps[-1] == "record"


@pytest.mark.parametrize(
    ("policy", "state", "restarted"),
    [
        ("always", "crashed", True),
        ("always", "stopped", True),
        ("on-failure", "crashed", True),
        ("on-failure", "stopped", False),
        ("never", "crashed", False),
        ("never", "stopped", False),
    ],
)
def test_restart_policy_decides_whether_a_vm_that_went_down_is_started(
    policy: str, state: RuntimeState, restarted: bool
) -> None:
    a = assignment("web-1", epoch=3, generation=2, restart_policy=policy)
    diff = diff_vms({"web-1": a}, {"web-1": vm_here(a, state=state)})
    plans = plan_actions(diff)
    if restarted:
        [plan] = plans
        assert plan.restart and plan.steps == ("start", "record")
        assert f"(restart policy {policy})" in plan.sentence
    else:
        assert plans == []
        [held] = diff.held
        assert held.reason.startswith(f"leaving vm web-1 {state}: restart policy {policy}")


def test_only_a_vm_that_went_down_on_its_own_counts_as_a_restart() -> None:
    a = assignment("web-1", epoch=3, generation=3, power_generation=3)
    [plan] = plan_actions(diff_vms({"web-1": a}, {"web-1": vm_here(a, state="crashed", applied=2)}))
    assert plan.steps == ("start", "record") and not plan.restart
