"""The etcd membership loop (leader only): learners become voters while voters are fewer than
``desired_voters``; members of hosts that left, or stayed dead past ``server_dead_grace_s``,
are removed. One change per pass, and never one that would lose quorum.
"""

from __future__ import annotations

import logging

from corral.control.context import LeaderContext
from corral.control.queue import Outcome
from corral.errors import Conflict
from corral.model import ClusterConfig, ClusterInfo, Node, utcnow
from corral.state import keys
from corral.state.codec import CodecError, decode
from corral.state.store import Member

__all__ = ["MembershipLoop", "plan_membership"]

log = logging.getLogger(__name__)
PASS_EVERY_S = 2.0


def _node_of(member: Member, nodes: dict[str, Node]) -> Node | None:
    if member.name in nodes:
        return nodes[member.name]
    for node in nodes.values():
        if node.status.etcd_peer_url and node.status.etcd_peer_url in member.peer_urls:
            return node
    return None


def _dead_for(node: Node) -> float:
    """Seconds the node has been down (0 when it is not down)."""
    if node.status.state != "down":
        return 0.0
    since = node.status.heartbeat_at or node.status.registered_at or node.created_at
    return (utcnow() - since).total_seconds()


def _keeps_quorum(voters: list[Member], removed: Member, healthy: set[int]) -> bool:
    """True when the voters left after removing ``removed`` have a healthy majority."""
    rest = [v for v in voters if v.id != removed.id]
    return bool(rest) and len([v for v in rest if v.id in healthy]) >= len(rest) // 2 + 1


def plan_membership(
    members: list[Member], nodes: dict[str, Node], config: ClusterConfig, healthy: set[int]
) -> tuple[str, int, str] | None:
    """The one membership change to make now: ``(action, member_id, sentence)`` or None.

    ``healthy`` holds the ids of members whose etcd answers. Pure.
    """
    voters = [m for m in members if not m.is_learner]
    # 1. Members whose host was removed or left the cluster.
    for m in members:
        if not m.name:
            # Added but not started yet: a host joining right now (its node record comes once
            # its etcd runs), not one that left.
            continue
        node = _node_of(m, nodes)
        if node is not None and node.status.state != "left":
            continue
        if not m.is_learner and not _keeps_quorum(voters, m, healthy):
            continue  # never the last voter, never one that would lose quorum
        who = node.name if node else (m.name or m.peer_urls[0])
        return "remove", m.id, f"removing etcd member {who}: its host left the cluster"
    # 2. Members of hosts dead past the grace period (standbys first).
    for m in sorted(members, key=lambda m: not m.is_learner):
        node = _node_of(m, nodes)
        if node is None or _dead_for(node) < config.server_dead_grace_s:
            continue
        if not m.is_learner and not _keeps_quorum(voters, m, healthy):
            continue
        return (
            "remove",
            m.id,
            (
                f"removing etcd member {node.name}: down for {_dead_for(node):.0f}s "
                f"(grace {config.server_dead_grace_s:.0f}s)"
            ),
        )
    # 3. Promote a ready standby while voters are short.
    if len(voters) < config.desired_voters:
        for m in members:
            node = _node_of(m, nodes)
            ready = node is not None and node.status.state == "ready"
            if m.is_learner and m.id in healthy and ready:
                return (
                    "promote",
                    m.id,
                    (
                        f"promoting etcd learner {m.name or m.peer_urls[0]} to voter "
                        f"({len(voters)} of {config.desired_voters} voters)"
                    ),
                )
    return None


class MembershipLoop:
    def __init__(self, ctx: LeaderContext) -> None:
        self.ctx = ctx

    def _config(self) -> ClusterConfig:
        kv = self.ctx.informer.get(keys.CLUSTER)
        if kv is None:
            return ClusterConfig()
        try:
            return decode("cluster", kv.value, ClusterInfo).config
        except CodecError:
            return ClusterConfig()

    async def reconcile(self, _: str) -> Outcome:
        members = await self.ctx.store.members()
        nodes = {n.name: n for n in self.ctx.all(Node)}
        # Asked over the store's own (TLS) connection settings: members answer only to those.
        store = self.ctx.store
        healthy = {
            m.id for m in members if m.client_urls and await store.member_healthy(m.client_urls[0])
        }
        change = plan_membership(members, nodes, self._config(), healthy)
        if change is None:
            return Outcome(requeue_after=PASS_EVERY_S)
        action, member_id, sentence = change
        try:
            if action == "promote":
                await self.ctx.store.promote_member(member_id)
            else:
                await self.ctx.store.remove_member(member_id)
        except Conflict as exc:
            # e.g. the learner has not caught up yet: etcd says so; try again next pass.
            return Outcome(f"{sentence}: not yet ({exc})", requeue_after=PASS_EVERY_S)
        return Outcome(sentence, requeue_after=PASS_EVERY_S)
