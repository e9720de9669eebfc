"""The node-health loop: a node is ready while its liveness lease lives."""

from __future__ import annotations

from corral.control.context import LeaderContext
from corral.control.queue import Outcome
from corral.model.common import utcnow
from corral.state import Objects

__all__ = ["NodeHealthLoop"]


class NodeHealthLoop:
    def __init__(self, ctx: LeaderContext) -> None:
        self.ctx = ctx

    async def reconcile(self, name: str) -> Outcome:
        node = self.ctx.node(name)
        if node is None:
            return Outcome()
        now = utcnow()
        requeue: float | None = None
        if self.ctx.has_liveness(name):
            state, message = "ready", "liveness lease held"
        else:
            last = node.status.heartbeat_at or node.status.registered_at or node.created_at
            silent = (now - last).total_seconds()
            if silent >= self.ctx.settings.node_down_after_s:
                state = "down"
                message = f"no liveness lease for {silent:.0f}s"
            else:
                state = "not-ready"
                message = "liveness lease expired or revoked"
                requeue = self.ctx.settings.node_down_after_s - silent + 0.5
        if node.status.state == state:
            return Outcome(requeue_after=requeue)
        old = node.status.state
        node.status.state = state  # type: ignore[assignment]
        node.status.message = message
        node.updated_at = now
        await self.ctx.commit([Objects.put(node)], [Objects.expect_unchanged(node)])
        return Outcome(f"node {name} is now {state} (was {old}): {message}", requeue_after=requeue)
