from __future__ import annotations

from corral.scheduler import NodeView, Request, Snapshot, schedule


def _node(name: str, **kw: object) -> NodeView:
    base: dict[str, object] = {
        "state": "ready",
        "roles": ("server", "compute"),
        "cpus": 4,
        "memory_mib": 4096,
    }
    base.update(kw)
    return NodeView(name=name, **base)  # type: ignore[arg-type]


def test_picks_the_least_loaded_node() -> None:
    snap = Snapshot((_node("n1", used_memory_mib=3000), _node("n2", used_memory_mib=100)))
    plan = schedule(snap, Request("web-1", 1, 512))
    assert plan.node == "n2"
    assert plan.explain().startswith("placing vm web-1 on node n2")


def test_every_rejection_has_its_reason() -> None:
    snap = Snapshot(
        (
            _node("n1", state="not-ready"),
            _node("n2", used_memory_mib=4000),
            _node("n3", roles=("server",)),
            _node("n4", cpus=1, used_vcpus=4),
        ),
        cpu_allocation_ratio=4.0,
    )
    plan = schedule(snap, Request("big", 2, 512))
    assert plan.node is None
    assert plan.rejected == {
        "n1": "node is not ready (not-ready)",
        "n2": "insufficient memory (needs 512 MiB, 96 free)",
        "n3": "node does not have the compute role",
        "n4": "insufficient vcpus (needs 2, 0 free)",
    }
    assert "cannot be placed" in plan.explain()


def test_memory_overcommit_ratio_is_honoured() -> None:
    node = _node("n1", memory_mib=1000, used_memory_mib=1000)
    assert schedule(Snapshot((node,)), Request("a", 1, 500)).node is None
    assert (
        schedule(Snapshot((node,), memory_allocation_ratio=1.5), Request("a", 1, 500)).node == "n1"
    )


def test_empty_cluster() -> None:
    plan = schedule(Snapshot(()), Request("a", 1, 64))
    assert plan.node is None and "no nodes" in plan.explain()
