from __future__ import annotations

from typing import Any

import pytest

from corral.control.tasks import evaluate, steps_for
from corral.model import Target, Task, TaskSpec, Vm, VmSpec, VmStatus, utcnow


def _task(action: str, **params: Any) -> Task:
    now = utcnow()
    return Task(
        name="t1",
        id="t1",
        created_at=now,
        updated_at=now,
        spec=TaskSpec(action=action, target=Target(kind="vm", name="web-1"), params=params),
        status={"steps": steps_for(action)},
    )  # type: ignore[arg-type]


def _vm(state: str, observed: int, node: str | None = "n1", **kw: Any) -> Vm:
    now = utcnow()
    return Vm(
        name="web-1",
        id="v1",
        created_at=now,
        updated_at=now,
        spec=VmSpec(),
        status=VmStatus(state=state, node=node, observed_generation=observed),  # type: ignore[arg-type]
        **kw,
    )


@pytest.mark.parametrize(
    ("action", "params", "vm", "state", "step_or_error"),
    [
        (
            "create",
            {"generation": 1, "expected_state": "running"},
            _vm("pending", 0, None),
            "running",
            "waiting for a node",
        ),
        (
            "create",
            {"generation": 1, "expected_state": "running"},
            _vm("starting", 0),
            "running",
            "starting on node n1",
        ),
        (
            "create",
            {"generation": 1, "expected_state": "running"},
            _vm("running", 1),
            "succeeded",
            "vm web-1 running on n1",
        ),
        (
            "stop",
            {"generation": 3, "expected_state": "stopped"},
            _vm("running", 2),
            "running",
            "stopping on node n1",
        ),
        (
            "stop",
            {"generation": 3, "expected_state": "stopped"},
            _vm("running", 4),
            "cancelled",
            "superseded by a later request",
        ),
        (
            "start",
            {"generation": 2, "expected_state": "running"},
            _vm("failed", 2),
            "failed",
            "the node failed",
        ),
        (
            "start",
            {"generation": 2, "expected_state": "running"},
            None,
            "failed",
            "was deleted before this task ended",
        ),
        (
            "start",
            {"generation": 2, "expected_state": "running"},
            _vm("running", 1, deleting=True),
            "cancelled",
            "is being deleted",
        ),
        (
            "pause",
            {"generation": 3, "expected_state": "paused"},
            _vm("running", 2),
            "running",
            "pausing on node n1",
        ),
        (
            "pause",
            {"generation": 3, "expected_state": "paused"},
            _vm("paused", 3),
            "succeeded",
            "vm web-1 paused on n1",
        ),
        (
            "resume",
            {"generation": 4, "expected_state": "running"},
            _vm("paused", 3),
            "running",
            "resuming on node n1",
        ),
        (
            "resume",
            {"generation": 4, "expected_state": "running"},
            _vm("running", 4),
            "succeeded",
            "vm web-1 running on n1",
        ),
        (
            "start",
            {"generation": 2, "expected_state": "running"},
            _vm("crashed", 2),
            "failed",
            "vm web-1 crashed",
        ),
        (
            "stop",
            {"generation": 2, "expected_state": "stopped"},
            _vm("crashed", 1),
            "running",
            "stopping on node n1",
        ),
        ("delete", {"generation": 2}, _vm("deleting", 1), "running", "removing vm from node n1"),
        ("delete", {"generation": 2}, None, "succeeded", "vm deleted"),
    ],
)
def test_task_outcome_follows_observed_state(
    action: str, params: dict[str, Any], vm: Vm | None, state: str, step_or_error: str
) -> None:
    status = evaluate(_task(action, **params), vm)
    assert status.state == state
    assert step_or_error in (status.error or status.step)


def test_success_finishes_every_step_and_reports_where() -> None:
    status = evaluate(_task("create", generation=1, expected_state="running"), _vm("running", 1))
    assert status.progress == 1.0
    assert [s.state for s in status.steps] == ["done", "done", "done", "done"]
    assert status.result == {"node": "n1", "state": "running"}
    assert status.finished_at is not None


def test_create_shows_the_disk_and_hypervisor_steps_the_host_reports() -> None:
    from corral.model.assignment import ALLOCATING_DISKS, STARTING_HYPERVISOR

    task = _task("create", generation=1, expected_state="running")
    vm = _vm("starting", 0)
    vm.status.message = ALLOCATING_DISKS
    status = evaluate(task, vm)
    assert [s.state for s in status.steps] == ["done", "done", "running", "pending"]
    assert status.step == "allocating disks on node n1"
    vm.status.message = STARTING_HYPERVISOR
    status = evaluate(task, vm)
    assert [s.state for s in status.steps] == ["done", "done", "done", "running"]
    assert status.step == "disks ready; starting the vm on node n1"
