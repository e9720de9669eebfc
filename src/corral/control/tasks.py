"""The task loop: derives each VM task's progress from what the nodes observed.

A task is never "done because we asked": it succeeds when the VM's observed state shows the
intent applied (``observed_generation >= task generation`` and the expected state). Because the
outcome is recomputed from state, a task interrupted by a crash simply resumes here.
"""

from __future__ import annotations

from datetime import timedelta

from corral.control.context import LeaderContext
from corral.control.queue import Outcome
from corral.model import Step, Task, TaskStatus, Vm
from corral.model.assignment import ALLOCATING_DISKS, STARTING_HYPERVISOR
from corral.model.common import utcnow
from corral.state import Objects

__all__ = ["SERVICE_ACTIONS", "TaskLoop", "steps_for"]

# Tasks whose progress the server doing the work writes itself (snapshots, clones): this loop
# only fails them when their deadline passes (the server died mid-way).
SERVICE_ACTIONS = frozenset(
    {"snapshot-create", "snapshot-rollback", "snapshot-delete", "clone", "instantiate"}
)

_STEPS: dict[str, list[str]] = {
    "create": ["accepted", "placed", "disks allocated", "applied on node"],
    "start": ["accepted", "disks allocated", "applied on node"],
    "stop": ["accepted", "applied on node"],
    "reboot": ["accepted", "applied on node"],
    "pause": ["accepted", "applied on node"],
    "resume": ["accepted", "applied on node"],
    "delete": ["accepted", "removed from node", "forgotten"],
    "attach-disk": ["accepted", "applied on node"],
    "detach-disk": ["accepted", "applied on node"],
    "snapshot-create": ["accepted", "snapshotting on node", "recorded"],
    "snapshot-rollback": ["accepted", "rolling back on node", "recorded"],
    "snapshot-delete": ["accepted", "deleting on node", "recorded"],
    "clone": ["accepted", "copying disks", "vm created"],
    "instantiate": ["accepted", "cloning disks", "vm created"],
    # Written by the migration loop (control/migrations.py), not by this one.
    "migrate": ["accepted", "prepare target", "transfer", "switch over", "clean source"],
}


def steps_for(action: str) -> list[Step]:
    return [Step(name=n) for n in _STEPS.get(action, ["accepted", "done"])]


def _progress(task: Task, done: int, step: str) -> TaskStatus:
    """A copy of the task's status with the first ``done`` steps finished."""
    now = utcnow()
    st = task.status.model_copy(deep=True)
    st.state = "running"
    st.started_at = st.started_at or now
    for i, s in enumerate(st.steps):
        if i < done and s.state != "done":
            s.state = "done"
            s.started_at = s.started_at or now
            s.finished_at = now
        elif i == done and s.state == "pending":
            s.state = "running"
            s.started_at = now
    st.progress = round(done / max(len(st.steps), 1), 3)
    st.step = step
    return st


def _finish(
    task: Task,
    state: str,
    *,
    error: str | None = None,
    result: dict | None = None,  # type: ignore[type-arg]
    step: str = "",
) -> TaskStatus:
    st = _progress(task, len(task.status.steps) if state == "succeeded" else 0, step)
    if state != "succeeded":
        st = task.status.model_copy(deep=True)
        for s in st.steps:
            if s.state == "running":
                s.state = "failed" if state == "failed" else "skipped"
                s.finished_at = utcnow()
        st.step = step or st.step
    st.state = state  # type: ignore[assignment]
    st.error = error
    st.result = result
    st.finished_at = utcnow()
    st.started_at = st.started_at or st.finished_at
    if state == "succeeded":
        st.progress = 1.0
    return st


def evaluate(task: Task, vm: Vm | None) -> TaskStatus:
    """The task's status given the VM as observed now. Pure."""
    action = task.spec.action
    name = task.spec.target.name
    if action == "delete":
        if vm is None:
            return _finish(task, "succeeded", step="vm deleted", result={"deleted": name})
        if vm.status.node is None:
            return _progress(task, 2, "forgetting vm")
        return _progress(task, 1, f"removing vm from node {vm.status.node}")
    if vm is None:
        return _finish(task, "failed", error=f"vm {name} was deleted before this task ended")
    generation = int(task.spec.params.get("generation", 0))
    expected = str(task.spec.params.get("expected_state", "running"))
    if vm.deleting:
        return _finish(task, "cancelled", error=f"superseded: vm {name} is being deleted")
    applied = vm.status.observed_generation >= generation
    if applied and vm.status.state == "failed":
        return _finish(task, "failed", error=vm.status.message or "the node failed the request")
    if applied and vm.status.state == "crashed" and expected != "stopped":
        return _finish(task, "failed", error=f"vm {name} crashed: {vm.status.message}")
    if applied and vm.status.state == expected:
        return _finish(
            task,
            "succeeded",
            step=f"vm {name} {expected} on {vm.status.node}",
            result={"node": vm.status.node, "state": vm.status.state},
        )
    if vm.status.observed_generation > generation:
        return _finish(task, "cancelled", error="superseded by a later request for this vm")
    if action == "create" and vm.status.node is None:
        return _progress(task, 1, vm.status.message or "waiting for a node")
    done = 2 if action == "create" else 1
    if action in ("create", "start") and vm.status.state == "starting":
        where = f"on node {vm.status.node}"
        if vm.status.message == ALLOCATING_DISKS:
            return _progress(task, done, f"allocating disks {where}")
        if vm.status.message == STARTING_HYPERVISOR:
            return _progress(task, done + 1, f"disks ready; starting the vm {where}")
    verb = {"running": "starting", "stopped": "stopping", "paused": "pausing"}.get(
        expected, "applying"
    )
    if action in ("reboot", "resume"):
        verb = f"{action[:-1]}ing"
    return _progress(task, done, f"{verb} on node {vm.status.node}")


def _same(a: TaskStatus, b: TaskStatus) -> bool:
    return (a.state, a.progress, a.step, a.error, [s.state for s in a.steps]) == (
        b.state,
        b.progress,
        b.step,
        b.error,
        [s.state for s in b.steps],
    )


class TaskLoop:
    def __init__(self, ctx: LeaderContext) -> None:
        self.ctx = ctx

    async def _deadline_only(self, task: Task) -> Outcome:
        deadline = task.deadline_at or task.created_at + timedelta(
            seconds=self.ctx.settings.task_timeout_s
        )
        if utcnow() < deadline:
            return Outcome(requeue_after=max((deadline - utcnow()).total_seconds(), 0.1))
        status = _finish(
            task, "failed", error=f"timed out at {task.status.step or 'start'} (server gone?)"
        )
        task = task.model_copy(update={"status": status, "updated_at": utcnow()})
        await self.ctx.commit([Objects.put(task)], [Objects.expect_unchanged(task)])
        return Outcome(f"task {task.id[:8]} ({task.spec.action}): timed out")

    async def reconcile(self, task_id: str) -> Outcome:
        # Read-only views of the cache: the task is copied (with its new status) to commit.
        task = self.ctx.peek(Task, task_id)
        if task is None or task.final or task.spec.action == "migrate":
            return Outcome()
        if task.spec.action in SERVICE_ACTIONS:
            return await self._deadline_only(task)
        vm = self.ctx.peek(Vm, task.spec.target.name) if task.spec.target.kind == "vm" else None
        if vm is not None and vm.id != task.spec.params.get("vm_id", vm.id):
            vm = None  # a new VM under the same name is not this task's VM
        status = evaluate(task, vm)
        deadline = task.deadline_at or task.created_at + timedelta(
            seconds=self.ctx.settings.task_timeout_s
        )
        if status.state == "running" and utcnow() >= deadline:
            status = _finish(
                task, "failed", error=f"timed out at {status.step or 'start'}; check `vm show`"
            )
        if _same(status, task.status):
            return Outcome(requeue_after=max((deadline - utcnow()).total_seconds(), 0.1))
        task = task.model_copy(update={"status": status, "updated_at": utcnow()})
        await self.ctx.commit([Objects.put(task)], [Objects.expect_unchanged(task)])
        msg = f"task {task.id[:8]} ({task.spec.action} vm {task.spec.target.name}): {status.state}"
        if status.state == "running":
            return Outcome(msg + f", {status.step}")
        return Outcome(msg + (f": {status.error}" if status.error else ""))
