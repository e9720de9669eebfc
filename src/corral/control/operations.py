"""The operation loop: runs drain and rebalance tasks (moves with a concurrency limit, progress,
cancel) and the optional automatic rebalancer.

Moves go through a :class:`Mover`, the one seam between this loop and how a VM changes host:

* ``start(vm, target)`` asks for VM ``vm`` to move to host ``target`` and returns a handle
  (for live migration: the migrate task's id);
* ``state(handle)`` says how that move is doing: ``(state, message)`` with state one of
  ``running``, ``succeeded``, ``failed``.

:class:`LiveMover` (the default) moves a running VM by live migration: it writes a Migration
record and its ``migrate`` task as ``POST /vms/{name}/migrate`` does, the migration loop
(``control.migrations``) carries it out and moves the VM's allocation record at switch-over,
and the move's state is that task's. A VM that is not running, or whose hosts cannot migrate
(different drivers, a KVM guest), moves cold through :class:`RelocatingMover`: its placement
(status.node, assignment, allocation records) changes in one transaction through the plan
applier, the source host stops the VM and the target starts it (the guest restarts, but it
was not running anyway unless its hosts cannot migrate). Neither moves a VM being deleted.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Protocol

from corral.control.context import LeaderContext
from corral.control.migrations import migration_records
from corral.control.placement import (
    Allocation,
    Placement,
    PlanApplier,
    cluster_config,
    leader_snapshot,
    move_dict,
    plan_drain,
)
from corral.control.queue import Outcome
from corral.control.vms import volume_host
from corral.errors import Conflict
from corral.model import Target, Task, TaskSpec, TaskStatus, Vm, cpu_gap, utcnow
from corral.model.common import new_time_id
from corral.model.migration import MigrationOptions
from corral.model.task import FINAL_TASK_STATES, Step
from corral.scheduler import plan_moves
from corral.state import Delete, Objects, Put, keys

__all__ = [
    "LIVE_DRIVERS",
    "OPERATION_ACTIONS",
    "LiveMover",
    "Mover",
    "OperationLoop",
    "RelocatingMover",
    "operation_task",
]

log = logging.getLogger(__name__)

OPERATION_ACTIONS = frozenset({"drain", "rebalance"})
POLL_S = 0.25
AUTO_KEY = "auto-rebalance"


def operation_task(
    action: str,
    target: Target,
    params: dict[str, Any],
    steps: list[str],
    timeout_s: float,
    *,
    actor: str = "corral:auto-rebalance",
    request_id: str = "",
    trace_id: str = "",
) -> Task:
    """A new drain or rebalance task record (pending; the operation loop runs it)."""
    now = utcnow()
    task_id = new_time_id()
    return Task(
        name=task_id,
        id=task_id,
        created_at=now,
        updated_at=now,
        spec=TaskSpec(action=action, target=target, params=params),
        status=TaskStatus(state="pending", step="accepted", steps=[Step(name=s) for s in steps]),
        actor=actor,
        request_id=request_id,
        trace_id=trace_id,
        deadline_at=now + timedelta(seconds=timeout_s),
    )


class Mover(Protocol):
    async def start(self, vm: str, target: str, reason: str) -> str:
        """Ask for ``vm`` to move to ``target``; returns a handle. Raises Conflict when the
        move cannot start now (it is tried again)."""

    def state(self, handle: str) -> tuple[str, str]:
        """``(running|succeeded|failed, message)`` of the move behind ``handle``."""


class RelocatingMover:
    """Moves a VM's placement to another host in one transaction (cold: the guest restarts
    there). The stand-in until live migration is connected; see the module doc."""

    def __init__(self, ctx: LeaderContext) -> None:
        self.ctx = ctx
        self.applier = PlanApplier(ctx)

    async def start(self, vm: str, target: str, reason: str) -> str:
        current = self.ctx.vm(vm)
        if current is None:
            raise Conflict(f"vm {vm} is gone")
        if current.deleting:
            raise Conflict(f"vm {vm} is being deleted")
        source = current.status.node
        if source is None or source == target:
            raise Conflict(f"vm {vm} is not placed on another host")
        current.status.node = target
        current.status.epoch += 1
        current.status.state = "pending" if current.spec.power_state == "stopped" else "starting"
        current.status.message = f"moved from {source} to {target} ({reason})"
        current.updated_at = utcnow()
        result = await self.applier.apply([Placement(current, target)], release={vm: source})
        if result.refused:
            raise Conflict(f"move of vm {vm} to {target} refused: {result.refused[vm]}")
        return f"{vm}/{current.id}/{target}/{current.status.epoch}"

    def state(self, handle: str) -> tuple[str, str]:
        name, vm_id, target, epoch = handle.split("/")
        vm = self.ctx.vm(name)
        if vm is None or vm.id != vm_id:
            return "failed", f"vm {name} was deleted"
        if vm.status.node != target or vm.status.epoch != int(epoch):
            return "failed", f"vm {name} was moved elsewhere ({vm.status.node})"
        want = vm.spec.power_state
        seen = vm.status.state
        if seen in ("failed", "crashed"):
            return "failed", f"vm {name} is {seen} on {target}: {vm.status.message}"
        if seen == want or (want == "stopped" and seen == "pending"):
            return "succeeded", f"vm {name} {seen} on {target}"
        return "running", f"vm {name} {seen} on {target}"


# Drivers whose guests migrate live between two hosts running the same driver.
LIVE_DRIVERS = frozenset({"qemu", "fake"})
_LIVE_STATES = frozenset({"running", "paused"})


class LiveMover:
    """Moves a running VM by live migration (the guest keeps running: same boot, same
    ``started_at``); a VM that is not running, or whose hosts cannot migrate, is relocated
    cold by :class:`RelocatingMover` (nothing runs that could restart).

    ``start`` writes a Migration record and its ``migrate`` task exactly as
    ``POST /vms/{name}/migrate`` does (``control.migrations.migration_records``), through the
    leader's fenced commit; the migration loop does the rest, and its switch-over moves the
    VM's allocation record. ``state`` reads that task from the leader's cache. Handles are
    ``live:<task id>`` or ``cold:<relocation handle>``."""

    def __init__(self, ctx: LeaderContext) -> None:
        self.ctx = ctx
        self.cold = RelocatingMover(ctx)

    def live_reason(self, vm: Vm, target: str) -> str | None:
        """None when ``vm`` can move live to ``target``, else why it moves cold."""
        if vm.status.state not in _LIVE_STATES:
            return f"vm {vm.name} is {vm.status.state}"
        assert vm.status.node is not None
        invs = []
        for host in (vm.status.node, target):
            node = self.ctx.node(host)
            invs.append(node.status.inventory if node is not None else None)
        drivers = [inv.driver if inv is not None else "?" for inv in invs]
        if drivers[0] != drivers[1]:
            return f"the hosts run different drivers ({drivers[0]}, {drivers[1]})"
        if drivers[0] not in LIVE_DRIVERS:
            return f"driver {drivers[0]} cannot migrate live"
        if vm.status.runtime.get("qemu.accel") == "kvm":
            gap = cpu_gap(*(inv.cpu if inv is not None else None for inv in invs))
            if gap is not None:
                return f"the guest runs with -cpu host and {target} does not fit: {gap}"
        return None

    async def start(self, vm: str, target: str, reason: str) -> str:
        current = self.ctx.vm(vm)
        if current is None:
            raise Conflict(f"vm {vm} is gone")
        if current.deleting:
            raise Conflict(f"vm {vm} is being deleted")
        source = current.status.node
        if source is None or source == target:
            raise Conflict(f"vm {vm} is not placed on another host")
        previous = self.ctx.migration(vm)
        if previous is not None and not previous.final:
            raise Conflict(f"vm {vm} is already migrating to {previous.spec.target}")
        cold = self.live_reason(current, target)
        if cold is not None:
            log.info("vm %s moves cold to %s: %s", vm, target, cold)
            return "cold:" + await self.cold.start(vm, target, f"{reason}; {cold}")
        source_node = self.ctx.node(source)
        source_inv = source_node.status.inventory if source_node is not None else None
        _, task, ops, expect = migration_records(
            current,
            target,
            MigrationOptions(),
            local_volumes(self.ctx, current),
            reason,
            previous,
            actor=f"corral:{reason.split(' ', 1)[0]}",
            cpu=source_inv.cpu if source_inv is not None else None,
        )
        await self.ctx.commit(ops, expect)
        return "live:" + task.id

    def state(self, handle: str) -> tuple[str, str]:
        kind, _, rest = handle.partition(":")
        if kind != "live":
            return self.cold.state(rest if kind == "cold" else handle)
        task = self.ctx.task(rest)
        if task is None:
            return "failed", f"migrate task {rest} is gone"
        if task.status.state == "succeeded":
            return "succeeded", task.status.step
        if task.final:
            return "failed", task.status.error or f"migration {task.status.state}"
        return "running", f"migrating live: {task.status.step} (task {rest})"


def local_volumes(ctx: LeaderContext, vm: Vm) -> list[str]:
    """The VM's volumes on host-local pools (a live migration mirrors them)."""
    out = []
    for ref in vm.spec.disks:
        volume = ctx.volume(ref.volume)
        if volume is None:
            continue
        pool = ctx.pool(volume.spec.pool)
        if pool is None or not pool.spec.shared:
            out.append(volume.name)
    return out


def _result(task: Task) -> dict[str, Any]:
    r = dict(task.status.result or {})
    r.setdefault("moves", {})
    r.setdefault("evicted", {})
    r.setdefault("blocked", {})
    return r


class OperationLoop:
    def __init__(self, ctx: LeaderContext, mover: Mover | None = None) -> None:
        self.ctx = ctx
        self.mover: Mover = mover or LiveMover(ctx)
        self.applier = PlanApplier(ctx)

    async def reconcile(self, key: str) -> Outcome:
        if key == AUTO_KEY:
            return await self._auto_rebalance()
        task = self.ctx.task(key)
        if task is None or task.final:
            return Outcome()
        if task.spec.action not in OPERATION_ACTIONS:
            return Outcome()
        result = _result(task)
        moves: dict[str, dict[str, Any]] = result["moves"]
        for m in moves.values():
            if m["state"] == "running":
                m["state"], m["message"] = self.mover.state(m["handle"])
        in_flight = sum(1 for m in moves.values() if m["state"] == "running")
        concurrency = int(task.spec.params.get("concurrency", 2))
        if task.cancel_requested:
            if in_flight:
                step = f"cancelling: waiting for {in_flight} moves under way"
                return await self._save(task, result, "running", step)
            return await self._save(task, result, "cancelled", "cancelled: no further moves")
        if task.spec.action == "drain":
            done = await self._drain_step(task, result, concurrency - in_flight)
        else:
            done = await self._rebalance_step(task, result, concurrency - in_flight)
        in_flight = sum(1 for m in moves.values() if m["state"] == "running")
        if done and not in_flight:
            failed = {v: m["message"] for v, m in moves.items() if m["state"] == "failed"}
            blocked = result["blocked"]
            if failed or blocked:
                why = "; ".join(f"{v}: {w}" for v, w in {**failed, **blocked}.items())
                return await self._save(task, result, "failed", "done", error=why)
            return await self._save(task, result, "succeeded", "done")
        ok = sum(1 for m in moves.values() if m["state"] == "succeeded")
        step = f"moving vms: {ok} moved, {in_flight} moving"
        if result["evicted"]:
            step += f", {len(result['evicted'])} stopped (pending)"
        return await self._save(task, result, "running", step)

    # -- drain -------------------------------------------------------------------------------

    async def _drain_step(self, task: Task, result: dict[str, Any], slots: int) -> bool:
        """Start moves for the VMs still on the host; True once none is left to start."""
        node = task.spec.target.name
        moves = result["moves"]
        busy = {v for v, m in moves.items() if m["state"] == "running"}
        left = [v for v in self.ctx.placed_on(node) if v not in busy]
        if not left:
            return True
        force = bool(task.spec.params.get("force"))
        snapshot = leader_snapshot(self.ctx)
        vms = {v.name: v for v in self.ctx.all(Vm) if v.status.node == node}
        steps = plan_drain(snapshot, node, vms, lambda vm: volume_host(self.ctx, vm))
        waiting = False
        for step in steps:
            if step.vm in busy or step.vm in result["blocked"]:
                continue
            if step.blocker is not None:
                if force:
                    await self._evict(step.vm, node, step.blocker)
                    result["evicted"][step.vm] = step.blocker
                else:
                    result["blocked"][step.vm] = step.blocker
                continue
            if moves.get(step.vm, {}).get("state") in ("succeeded", "failed"):
                continue  # moved back by someone, or its move failed (reported at the end)
            if slots <= 0:
                waiting = True
                continue
            assert step.target is not None
            await self._start(moves, step.vm, node, step.target, f"drain of {node}")
            slots -= 1
            waiting = True
        return not waiting

    async def _evict(self, name: str, node: str, why: str) -> None:
        """Stop a VM that cannot leave the host and send it back to pending."""
        vm = self.ctx.vm(name)
        if vm is None or vm.status.node != node:
            return
        vm.status.node = None
        vm.status.state = "pending"
        vm.status.message = f"stopped by the drain of {node}: {why}"
        vm.updated_at = utcnow()
        kv = self.ctx.informer.get(keys.alloc_key(node))
        alloc = Allocation.decode(kv) if kv is not None else Allocation()
        before = alloc.expect(node)
        alloc.vms.pop(name, None)
        ops: list[Put | Delete] = [
            Objects.put(vm),
            Delete(keys.assign_key(node, name)),
            Put(keys.alloc_key(node), alloc.encode()),
        ]
        await self.ctx.commit(ops, [Objects.expect_unchanged(vm), before])

    async def _start(
        self, moves: dict[str, dict[str, Any]], vm: str, source: str, target: str, reason: str
    ) -> None:
        try:
            handle = await self.mover.start(vm, target, reason)
        except Conflict as exc:
            log.info("move of vm %s to %s not started: %s", vm, target, exc)
            return
        moves[vm] = {
            "source": source,
            "target": target,
            "handle": handle,
            "state": "running",
            "message": f"moving to {target}",
        }

    # -- rebalance ---------------------------------------------------------------------------

    async def _rebalance_step(self, task: Task, result: dict[str, Any], slots: int) -> bool:
        moves = result["moves"]
        planned = task.spec.params.get("moves") or []
        left = False
        for m in planned:
            vm, source, target = m["vm"], m["source"], m["target"]
            if vm in moves or vm in result["blocked"]:
                continue
            current = self.ctx.vm(vm)
            if current is None or current.status.node != source:
                result["blocked"][vm] = f"no longer on {source}"
                continue
            if slots <= 0:
                left = True
                continue
            await self._start(moves, vm, source, target, "rebalance")
            if vm not in moves:
                result["blocked"][vm] = f"{target} cannot take it any more"
            slots -= 1
        return not left

    async def _auto_rebalance(self) -> Outcome:
        minutes = cluster_config(self.ctx).auto_rebalance_minutes
        if minutes <= 0:
            return Outcome(requeue_after=60.0)
        for t in self.ctx.all(Task):
            if t.spec.action in OPERATION_ACTIONS and t.status.state not in FINAL_TASK_STATES:
                return Outcome(requeue_after=minutes * 60.0)
        snap = leader_snapshot(self.ctx)
        moves = plan_moves(snap, max_moves=4)
        if not moves:
            return Outcome("automatic rebalance: nothing to move", requeue_after=minutes * 60.0)
        plan = {
            "score_before": moves[0].score_before,
            "score_after": moves[-1].score_after,
            "moves": [move_dict(m) for m in moves],
        }
        task = operation_task(
            "rebalance",
            Target(kind="cluster", name="cluster"),
            {"concurrency": 2, **plan},
            ["plan", "move vms", "done"],
            self.ctx.settings.task_timeout_s * 6,
        )
        await self.ctx.commit([Objects.put(task)])
        return Outcome(
            f"automatic rebalance: {len(moves)} moves (task {task.id[:8]})",
            requeue_after=minutes * 60.0,
        )

    # -- task status -------------------------------------------------------------------------

    async def _save(
        self,
        task: Task,
        result: dict[str, Any],
        state: str,
        step: str,
        *,
        error: str | None = None,
    ) -> Outcome:
        now = utcnow()
        moves = result["moves"]
        planned = task.spec.params.get("vms") or [
            m["vm"] for m in task.spec.params.get("moves", [])
        ]
        total = max(len(planned), len(moves) + len(result["evicted"]), 1)
        ok = sum(1 for m in moves.values() if m["state"] in ("succeeded", "failed"))
        ok += len(result["evicted"])
        st: TaskStatus = task.status.model_copy(deep=True)
        st.state = state  # type: ignore[assignment]
        st.step = step
        st.result = result
        st.error = error
        st.started_at = st.started_at or now
        st.progress = 1.0 if state == "succeeded" else round(min(ok / total, 0.99), 3)
        final = state in FINAL_TASK_STATES
        for i, s in enumerate(st.steps):
            if s.state in ("done", "skipped", "failed"):
                continue
            if final:
                s.state = (
                    "done" if state == "succeeded" else "failed" if state == "failed" else "skipped"
                )
                s.started_at = s.started_at or now
                s.finished_at = now
            elif i == 1 or (i == 0 and task.spec.action == "rebalance"):
                s.state = "done" if i == 0 else "running"
                s.started_at = s.started_at or now
                if s.state == "done":
                    s.finished_at = now
        if final:
            st.finished_at = now
        label = f"task {task.id[:8]} ({task.spec.action} {task.spec.target.name})"
        if st.model_dump() == task.status.model_dump():
            return Outcome(requeue_after=None if final else POLL_S)
        task.status = st
        task.updated_at = now
        await self.ctx.commit([Objects.put(task)], [Objects.expect_unchanged(task)])
        if final:
            return Outcome(f"{label}: {state}" + (f": {error}" if error else ""))
        return Outcome(f"{label}: {step}", requeue_after=POLL_S)
