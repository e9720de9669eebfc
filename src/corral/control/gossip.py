"""The gossip loop (leader only): records how the hosts see each other over Serf.

Every pass reads the member list of this server's own Serf agent and writes each node's
``status.gossip`` when it changed. Gossip is advisory: the node-health loop combines it with
the liveness lease, which decides.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from corral.control.context import LeaderContext
from corral.control.queue import Outcome
from corral.errors import CorralError
from corral.model import Node, utcnow
from corral.state import Objects

__all__ = ["GossipLoop", "GossipView"]

# node name -> serf status ("alive", "failed", "left", "leaving", ...)
GossipView = Callable[[], Awaitable[dict[str, str]]]

PASS_EVERY_S = 1.0
_KNOWN = {"alive", "failed", "left", "leaving", "suspect"}


class GossipLoop:
    def __init__(self, ctx: LeaderContext, view: GossipView) -> None:
        self.ctx = ctx
        self.view = view

    async def reconcile(self, _: str) -> Outcome:
        try:
            seen = await self.view()
        except CorralError as exc:
            return Outcome(f"gossip view unavailable: {exc}", requeue_after=PASS_EVERY_S * 5)
        changed = []
        for node in self.ctx.all(Node):
            status = seen.get(node.name, "unknown")
            status = status if status in _KNOWN else "unknown"
            if node.status.gossip == status:
                continue
            fresh = self.ctx.node(node.name)
            if fresh is None:
                continue
            fresh.status.gossip = status  # type: ignore[assignment]
            fresh.status.gossip_since = utcnow()
            fresh.updated_at = utcnow()
            await self.ctx.commit([Objects.put(fresh)], [Objects.expect_unchanged(fresh)])
            changed.append(f"{node.name}: {status}")
        message = "gossip: " + ", ".join(changed) if changed else ""
        return Outcome(message, requeue_after=PASS_EVERY_S)
