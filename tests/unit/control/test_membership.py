from __future__ import annotations

from datetime import timedelta

import pytest

from corral.control.context import ControlSettings
from corral.control.membership import plan_membership
from corral.control.nodes import judge
from corral.model import ClusterConfig, Node, NodeStatus, utcnow
from corral.state.store import Member


def _member(i: int, name: str, learner: bool = False) -> Member:
    return Member(i, name, [f"http://127.0.0.{i}:2380"], [f"http://127.0.0.{i}:2379"], learner)


def _node(name: str, state: str = "ready", down_for_s: float = 0.0, gossip: str = "alive") -> Node:
    now = utcnow()
    return Node(
        name=name,
        id=name,
        created_at=now,
        updated_at=now,
        status=NodeStatus(
            state=state,  # type: ignore[arg-type]
            heartbeat_at=now - timedelta(seconds=down_for_s),
            gossip=gossip,  # type: ignore[arg-type]
        ),
    )


def _nodes(*nodes: Node) -> dict[str, Node]:
    return {n.name: n for n in nodes}


def test_learner_promoted_only_while_voters_are_short() -> None:
    members = [_member(1, "n1"), _member(2, "n2", learner=True), _member(3, "n3", learner=True)]
    nodes = _nodes(_node("n1"), _node("n2"), _node("n3"))
    assert plan_membership(members, nodes, ClusterConfig(desired_voters=1), {1, 2, 3}) is None
    action, member_id, sentence = plan_membership(
        members, nodes, ClusterConfig(desired_voters=3), {1, 2, 3}
    )  # type: ignore[misc]
    assert (action, member_id) == ("promote", 2)
    assert "1 of 3 voters" in sentence


def test_a_learner_that_is_not_ready_is_not_promoted() -> None:
    members = [_member(1, "n1"), _member(2, "n2", learner=True)]
    nodes = _nodes(_node("n1"), _node("n2", state="not-ready"))
    assert plan_membership(members, nodes, ClusterConfig(desired_voters=3), {1, 2, 3}) is None


def test_member_of_a_host_that_left_is_removed_but_never_the_last_voter() -> None:
    members = [_member(1, "n1"), _member(2, "n2")]
    nodes = _nodes(_node("n1"), _node("n2", state="left"))
    assert plan_membership(members, nodes, ClusterConfig(), {1, 2})[:2] == ("remove", 2)  # type: ignore[index]
    alone = [_member(1, "n1")]
    assert plan_membership(alone, _nodes(_node("n1", state="left")), ClusterConfig(), {1}) is None


@pytest.mark.parametrize(
    ("states", "removable"),
    [
        ({"n2": "ready", "n3": "ready"}, True),  # the others are healthy: quorum holds
        ({"n2": "ready", "n3": "not-ready"}, False),  # removing n1 would leave 1 of 2 healthy
    ],
)
def test_dead_voter_removed_only_when_the_rest_keep_quorum(
    states: dict[str, str], removable: bool
) -> None:
    members = [_member(1, "n1"), _member(2, "n2"), _member(3, "n3")]
    nodes = _nodes(
        _node("n1", state="down", down_for_s=400), *(_node(n, s) for n, s in states.items())
    )
    healthy = {1} | {i for i, n in ((2, "n2"), (3, "n3")) if states[n] == "ready"}
    change = plan_membership(members, nodes, ClusterConfig(server_dead_grace_s=300), healthy)
    assert (change is not None and change[:2] == ("remove", 1)) is removable


def test_dead_within_grace_is_kept() -> None:
    members = [_member(1, "n1"), _member(2, "n2"), _member(3, "n3")]
    nodes = _nodes(_node("n1", state="down", down_for_s=10), _node("n2"), _node("n3"))
    assert (
        plan_membership(members, nodes, ClusterConfig(server_dead_grace_s=300), {1, 2, 3}) is None
    )


@pytest.mark.parametrize(
    ("lease", "gossip", "silent_s", "state"),
    [
        (True, "failed", 0, "ready"),  # the lease decides
        (False, "alive", 5, "unreachable"),  # cut off from the servers, peers still see it
        (False, "failed", 5, "down"),  # both lost it
        (False, "unknown", 5, "not-ready"),
        (False, "unknown", 120, "down"),
    ],
)
def test_node_state_combines_lease_and_gossip(
    lease: bool, gossip: str, silent_s: float, state: str
) -> None:
    node = _node("c1", state="ready", down_for_s=silent_s, gossip=gossip)
    got, message, _ = judge(node, lease, ControlSettings(node_down_after_s=60))
    assert got == state
    assert "lease" in message and gossip in message


def test_a_learner_added_for_a_joining_host_is_not_removed_before_it_starts() -> None:
    # etcd names a member once it has started; until then its host has no node record yet.
    joining = [_member(1, "n1"), _member(2, "n2"), _member(3, "", learner=True)]
    nodes = _nodes(_node("n1"), _node("n2"))
    assert plan_membership(joining, nodes, ClusterConfig(desired_voters=3), {1, 2}) is None
    started = [_member(1, "n1"), _member(2, "n2"), _member(3, "n3", learner=True)]
    assert plan_membership(started, nodes, ClusterConfig(), {1, 2})[:2] == ("remove", 3)  # type: ignore[index]
