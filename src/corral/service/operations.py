"""Node maintenance and cluster moves: cordon, maintenance, drain, undrain, rebalance, and the
one task cancel (``POST /tasks/{id}/cancel``: migrations, drains, rebalances).

The handlers write intents and tasks; the leader's operation loop
(``control.operations.OperationLoop``) moves the VMs and records progress on the task.
A drain is refused (409 ``unschedulable``) when some VM cannot leave the host (it fits on no
other host, or a volume on the host's own disk pins it), unless ``force``: then those VMs are
stopped and go back to ``pending`` with the reason (``corral vm why``), to be placed as soon as
a host can take them.
"""

from __future__ import annotations

import contextlib
from typing import Any

from pydantic import Field

from corral.control.operations import operation_task
from corral.errors import Conflict, NodeReason, Unschedulable, ValidationFailed
from corral.model import Node, NodeSpec, Target, Task, Vm, utcnow
from corral.model.common import Strict, merge_patch
from corral.service.context import RequestMeta, ServiceContext
from corral.service.migrations import MigrationService
from corral.service.placement import PlacementService
from corral.service.validate import parse
from corral.state import Objects

__all__ = ["CANCELLABLE", "DrainBody", "OperationService", "RebalanceBody"]

# Task actions that stop part-way when cancelled.
CANCELLABLE = frozenset({"drain", "rebalance", "migrate"})
_NODE_PATCHABLE = {
    "cordoned",
    "maintenance",
    "reserved_vcpus",
    "reserved_memory_mib",
    "cpu_allocation_ratio",
    "memory_allocation_ratio",
}


class DrainBody(Strict):
    """Body of ``POST /api/v1/nodes/{name}/drain``."""

    force: bool = Field(
        default=False,
        description="drain even with blockers: VMs that cannot move are stopped and go pending",
    )
    concurrency: int = Field(default=2, ge=1, le=32, description="moves at the same time")


class RebalanceBody(Strict):
    """Body of ``POST /api/v1/cluster/rebalance``."""

    max_moves: int = Field(default=4, ge=0, le=100, description="moves in this plan at most")
    min_gain: float = Field(
        default=0.01, ge=0, le=1, description="least imbalance gain worth one migration"
    )
    concurrency: int = Field(default=2, ge=1, le=32, description="moves at the same time")


def node_task(
    meta: RequestMeta,
    action: str,
    target: Target,
    params: dict[str, Any],
    steps: list[str],
    timeout_s: float,
) -> Task:
    return operation_task(
        action,
        target,
        params,
        steps,
        timeout_s,
        actor=meta.actor,
        request_id=meta.request_id,
        trace_id=meta.trace_id,
    )


class OperationService:
    def __init__(
        self,
        ctx: ServiceContext,
        placement: PlacementService,
        migrations: MigrationService | None = None,
    ) -> None:
        self.ctx = ctx
        self.placement = placement
        self.migrations = migrations or MigrationService(ctx, placement)

    # -- node spec ---------------------------------------------------------------------------

    async def patch_node(self, name: str, patch: Any) -> Node:
        """JSON merge patch of a node's spec (cordon, maintenance, reservations, ratios)."""
        if not isinstance(patch, dict):
            raise ValidationFailed.one("", "type", "the body must be a JSON merge patch object")
        for key in patch:
            if key not in _NODE_PATCHABLE:
                raise ValidationFailed.one(
                    key,
                    "unknown-field",
                    f"unknown field; patchable: {', '.join(sorted(_NODE_PATCHABLE))} (labels "
                    "and roles come from the agent's --label and --role flags)",
                )
        if patch.get("maintenance") is True:
            await self._refuse_if_busy(name, "maintenance")

        def change(node: Node) -> Node | None:
            merged = merge_patch(node.spec.model_dump(mode="json"), patch)
            spec = parse(NodeSpec, merged)
            if spec == node.spec:
                return None
            node.spec = spec
            return node

        updated = await self.ctx.objects.update(Node, name, change)
        return updated or await self.ctx.objects.get(Node, name)

    async def cordon(self, name: str, on: bool) -> Node:
        return await self.patch_node(name, {"cordoned": on})

    async def maintenance(self, name: str, on: bool) -> Node:
        """On: the host must hold no VMs (drain it first); it takes none and is left out of
        capacity. Off: back in service (also uncordoned)."""
        if on:
            return await self.patch_node(name, {"maintenance": True, "cordoned": True})
        return await self.patch_node(name, {"maintenance": False, "cordoned": False})

    async def _refuse_if_busy(self, name: str, what: str) -> None:
        vms, _ = await self.ctx.objects.all(Vm)
        here = sorted(v.name for v in vms if v.status.node == name)
        if here:
            shown = ", ".join(here[:10]) + (" ..." if len(here) > 10 else "")
            raise Conflict(
                f"node {name!r} still holds {len(here)} VMs ({shown}); move them off first "
                f"with `corral node drain {name}`, then turn {what} on"
            )

    # -- drain -------------------------------------------------------------------------------

    async def drain(
        self, name: str, body: Any, meta: RequestMeta, *, dry_run: bool = False
    ) -> tuple[Node, Task | None, dict[str, Any]]:
        """Cordon ``name`` and start a drain task. Returns the node, the task (None for a dry
        run) and the plan: ``{"moves": [...], "blockers": [...]}``. Raises Unschedulable
        listing the blockers unless ``force``, and Conflict when a drain already runs."""
        req = parse(DrainBody, body if body is not None else {})
        node = await self.ctx.objects.get(Node, name)
        steps = await self.placement.drain_steps(name)
        blockers = [s for s in steps if s.blocker]
        plan = {
            "node": name,
            "moves": [s.as_dict() for s in steps if not s.blocker],
            "blockers": [s.as_dict() for s in blockers],
        }
        if dry_run:
            return node, None, plan
        running = await self._running("drain", name)
        if running is not None:
            raise Conflict(
                f"node {name!r} is already draining (task {running.id}); follow it with "
                f"`corral task watch {running.id}` or stop it with `corral node undrain {name}`"
            )
        if blockers and not req.force:
            raise Unschedulable(
                f"cannot drain node {name!r}: {len(blockers)} of {len(steps)} VMs cannot "
                "leave it; fix that (more capacity, another rule) or drain with --force to "
                "stop them and leave them pending",
                [NodeReason(name, f"vm {s.vm}: {s.blocker}") for s in blockers],
            )
        node.spec.cordoned = True
        node.updated_at = utcnow()
        task = node_task(
            meta,
            "drain",
            Target(kind="node", name=name),
            {
                "force": req.force,
                "concurrency": req.concurrency,
                "vms": [s.vm for s in steps],
                "blockers": [s.vm for s in blockers],
            },
            ["cordon", "move vms", "done"],
            self.ctx.settings.task_timeout_s * 6,
        )
        task.status.steps[0].state = "done"
        task.status.steps[0].started_at = task.status.steps[0].finished_at = task.created_at
        rev = await self.ctx.store.commit(
            [Objects.put(node), Objects.put(task)], [Objects.expect_unchanged(node)]
        )
        node.mod_revision = task.create_revision = task.mod_revision = rev
        return node, task, plan

    async def undrain(self, name: str) -> Node:
        """Uncordon the host and stop its running drain (moves under way finish)."""
        running = await self._running("drain", name)
        if running is not None:
            with contextlib.suppress(Conflict):  # it ended meanwhile
                await self.cancel(running.id)
        return await self.cordon(name, False)

    async def _running(self, action: str, target: str) -> Task | None:
        tasks, _ = await self.ctx.objects.all(Task)
        for t in tasks:
            if t.spec.action == action and t.spec.target.name == target and not t.final:
                return t
        return None

    # -- rebalance ---------------------------------------------------------------------------

    async def rebalance(
        self, body: Any, meta: RequestMeta, *, dry_run: bool
    ) -> tuple[dict[str, Any], Task | None]:
        """The rebalancer's moves and score before/after; without ``dry_run``, a task that
        runs them (as live migrations) with ``concurrency`` at a time."""
        req = parse(RebalanceBody, body if body is not None else {})
        plan = await self.placement.rebalance(req.max_moves, req.min_gain)
        if dry_run or not plan["moves"]:
            return plan, None
        running = await self._running("rebalance", "cluster")
        if running is not None:
            raise Conflict(f"a rebalance is already running (task {running.id})")
        task = node_task(
            meta,
            "rebalance",
            Target(kind="cluster", name="cluster"),
            {"concurrency": req.concurrency, **plan},
            ["plan", "move vms", "done"],
            self.ctx.settings.task_timeout_s * 6,
        )
        rev = await self.ctx.store.commit([Objects.put(task)], [])
        task.create_revision = task.mod_revision = rev
        return plan, task

    # -- cancel ------------------------------------------------------------------------------

    async def cancel(self, task_id: str) -> Task:
        """``POST /tasks/{id}/cancel`` for every task that can stop part-way: a migration
        rolls back (the guest stays on its source), a drain or a rebalance starts no further
        moves (moves under way finish). 409 for a task that ended or cannot stop part-way."""
        task = await self.ctx.objects.get(Task, task_id)
        if task.final:
            raise Conflict(f"task {task_id} already ended ({task.status.state})")
        if task.spec.action not in CANCELLABLE:
            raise Conflict(
                f"task {task_id} ({task.spec.action}) cannot be cancelled part-way; "
                f"cancellable: {', '.join(sorted(CANCELLABLE))} (a start or stop is undone by "
                "the opposite action)"
            )
        if task.spec.action == "migrate":
            return await self.migrations.cancel(task_id)

        def change(task: Task) -> Task | None:
            if task.final or task.cancel_requested:
                return None
            task.cancel_requested = True
            return task

        updated = await self.ctx.objects.update(Task, task_id, change)
        return updated or await self.ctx.objects.get(Task, task_id)
