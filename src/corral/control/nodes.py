"""The node-health loop: a node is ready while its liveness lease lives."""

from __future__ import annotations

from corral.control.context import ControlSettings, LeaderContext
from corral.control.queue import Outcome
from corral.model import Node, rfc3339
from corral.model.common import utcnow
from corral.state import Objects

__all__ = ["NodeHealthLoop"]


def judge(node: Node, lease_held: bool, settings: ControlSettings) -> tuple[str, str, float | None]:
    """The node's state from its two signals: the servers' (its lease) and its peers' (gossip).

    Returns (state, message naming the signals, seconds after which to judge again). Pure.
    """
    gossip = node.status.gossip
    if lease_held:
        return "ready", f"liveness lease held; gossip: {gossip}", None
    last = node.status.heartbeat_at or node.status.registered_at or node.created_at
    silent = (utcnow() - last).total_seconds()
    lost = f"no liveness lease since {rfc3339(last)}"
    if gossip in ("alive", "suspect"):
        return "unreachable", f"{lost}, but its peers still see it ({gossip}): cut off", 2.0
    if gossip in ("failed", "left", "leaving"):
        return "down", f"{lost}, and its peers lost it too (gossip: {gossip})", None
    if silent >= settings.node_down_after_s:
        return "down", f"{lost} for over {settings.node_down_after_s:.0f}s; gossip: {gossip}", None
    return "not-ready", f"{lost}; gossip: {gossip}", settings.node_down_after_s - silent + 0.5


class NodeHealthLoop:
    def __init__(self, ctx: LeaderContext) -> None:
        self.ctx = ctx

    async def reconcile(self, name: str) -> Outcome:
        node = self.ctx.node(name)
        if node is None:
            return Outcome()
        if node.status.state == "left":
            return Outcome()
        state, message, requeue = judge(node, self.ctx.has_liveness(name), self.ctx.settings)
        if (node.status.state, node.status.message) == (state, message):
            return Outcome(requeue_after=requeue)
        old = node.status.state
        node.status.state = state  # type: ignore[assignment]
        node.status.message = message
        node.updated_at = utcnow()
        await self.ctx.commit([Objects.put(node)], [Objects.expect_unchanged(node)])
        if old == state:
            return Outcome(requeue_after=requeue)
        return Outcome(f"node {name} is now {state} (was {old}): {message}", requeue_after=requeue)
