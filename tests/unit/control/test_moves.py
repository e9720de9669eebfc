"""Live moves on the leader: the migration task's progress sentence, the live mover of drains
and rebalances, and the switch-over moving the VM's allocation record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from corral.control.context import ControlSettings, LeaderContext
from corral.control.informer import Informer
from corral.control.migrations import MigrationLoop, migration_records, progress_step
from corral.control.operations import LiveMover, RelocatingMover
from corral.control.placement import Allocation, Placement, PlanApplier
from corral.control.vms import VmLoop
from corral.errors import Conflict
from corral.model import HostCpu, Migration, Node, Vm, VmSpec, VmStatus, utcnow
from corral.model.migration import MigrationOptions, MigrationReport
from corral.model.node import Inventory, NodeStatus
from corral.state import KV, Delete, Expect, Objects, Put, keys

TERM = 7


class MiniStore:
    """Enough of the etcd store for the leader's commits: compares, then writes."""

    def __init__(self) -> None:
        self.rev = TERM
        self.data: dict[str, KV] = {keys.LEADER: KV(keys.LEADER, b"me", TERM, TERM, 1, 0)}
        self.commits = 0

    async def get_many(self, wanted: Sequence[str]) -> tuple[dict[str, KV], int]:
        return {k: self.data[k] for k in wanted if k in self.data}, self.rev

    def write_behind_the_cache(self, obj: Any) -> None:
        """What another process wrote, which this leader's watch has not delivered yet."""
        self.rev += 1
        old = self.data.get(Objects.key(type(obj), obj.name))
        created = old.create_revision if old else self.rev
        put = Objects.put(obj)
        self.data[put.key] = KV(put.key, put.value, created, self.rev, 1, 0)

    async def commit(self, ops: Sequence[Put | Delete], expect: Sequence[Expect] = ()) -> int:
        for e in expect:
            kv = self.data.get(e.key)
            if e.create_revision is not None:
                have = kv.create_revision if kv else 0
                if have != e.create_revision:
                    raise Conflict(f"{e.key}: created at {have}, not {e.create_revision}")
            elif e.mod_revision is not None:
                have = kv.mod_revision if kv else 0
                if have != e.mod_revision:
                    raise Conflict(f"{e.key}: revision {have}, not {e.mod_revision}")
        self.rev += 1
        self.commits += 1
        for op in ops:
            if isinstance(op, Put):
                old = self.data.get(op.key)
                created = old.create_revision if old else self.rev
                self.data[op.key] = KV(op.key, op.value, created, self.rev, 1, 0)
            else:
                self.data.pop(op.key, None)
        return self.rev


def _ctx() -> tuple[LeaderContext, MiniStore]:
    store = MiniStore()
    informer = Informer(store, keys.PREFIX)  # type: ignore[arg-type]
    return LeaderContext(store, informer, TERM, ControlSettings()), store  # type: ignore[arg-type]


async def _put(ctx: LeaderContext, *objs: Any) -> None:
    await ctx.commit([Objects.put(o) for o in objs])


def _node(name: str, driver: str = "fake", **spec: Any) -> Node:
    now = utcnow()
    inv = Inventory(
        cpus=4,
        memory_mib=1024,
        disk_gib=10,
        disk_free_gib=10,
        hostname=name,
        kernel="k",
        corral_version="0",
        driver=driver,
    )
    node = Node(
        name=name,
        id=name,
        created_at=now,
        updated_at=now,
        status=NodeStatus(state="ready", inventory=inv),
    )
    node.spec = node.spec.model_copy(update=spec)
    return node


def _vm(
    name: str = "web-1",
    state: str = "running",
    memory_mib: int = 256,
    runtime: dict[str, str] | None = None,
    **kw: Any,
) -> Vm:
    now = utcnow()
    status = VmStatus(state=state, node="n1", epoch=3, observed_epoch=3, runtime=runtime or {})  # type: ignore[arg-type]
    return Vm(
        name=name,
        id=f"id-{name}",
        created_at=now,
        updated_at=now,
        spec=VmSpec(memory_mib=memory_mib),
        status=status,
        **kw,
    )


async def _cluster(*vms: Vm, target_memory: int = 1024) -> LeaderContext:
    ctx, _ = _ctx()
    n2 = _node("n2")
    assert n2.status.inventory is not None
    n2.status.inventory.memory_mib = target_memory
    await _put(ctx, _node("n1"), n2, *vms)
    for vm in vms:
        ctx.track(Objects.key(Vm, vm.name))
    alloc = Allocation({v.name: (v.spec.vcpus, v.spec.memory_mib) for v in vms})
    await ctx.commit([Put(keys.alloc_key("n1"), alloc.encode())])
    return ctx


def _alloc(ctx: LeaderContext, node: str) -> dict[str, tuple[int, int]]:
    kv = ctx.informer.get(keys.alloc_key(node))
    return Allocation.decode(kv).vms if kv is not None else {}


@pytest.mark.parametrize(
    ("report", "step", "progress"),
    [
        (None, "starting the transfer", 0.4),
        (dict(status="listening"), "starting the transfer", 0.4),
        (
            dict(status="mirroring", disk_transferred_bytes=512 << 20, disk_total_bytes=1 << 30),
            "copying local disks: 512 MiB of 1024 MiB",
            0.5,
        ),
        (
            dict(status="active", transferred_bytes=3 << 20, remaining_bytes=1 << 20),
            "transferring memory: 3 MiB sent, 1 MiB remaining, dirty rate 0 pages/s",
            0.75,
        ),
        (
            dict(
                status="active",
                transferred_bytes=0,
                remaining_bytes=0,
                expected_downtime_ms=40,
                downtime_limit_ms=300,
                message="not converging",
            ),
            "transferring memory: 0 MiB sent, 0 MiB remaining, dirty rate 0 pages/s, "
            "expected downtime 40 ms, limit 300 ms (not converging)",
            0.6,
        ),
    ],
)
def test_progress_step(report: dict[str, Any] | None, step: str, progress: float) -> None:
    r = MigrationReport(id="m", role="source", **report) if report is not None else None
    assert progress_step(r) == (step, pytest.approx(progress))


async def test_live_mover_writes_a_migration_and_follows_its_task() -> None:
    ctx = await _cluster(_vm())
    mover = LiveMover(ctx)
    handle = await mover.start("web-1", "n2", "drain of n1")
    assert handle.startswith("live:")
    m = ctx.migration("web-1")
    assert m is not None and m.spec.source == "n1" and m.spec.target == "n2"
    task = ctx.task(m.spec.task)
    assert task is not None and task.spec.action == "migrate" and task.actor == "corral:drain"
    assert handle == f"live:{task.id}"
    assert mover.state(handle)[0] == "running"
    # A second move while it migrates is refused (tried again later).
    with pytest.raises(Conflict, match="already migrating"):
        await mover.start("web-1", "n2", "drain of n1")
    task.status.state = "failed"
    task.status.error = "target host n2: refused"
    await _put(ctx, task)
    assert mover.state(handle) == ("failed", "target host n2: refused")
    task.status.state = "succeeded"
    await _put(ctx, task)
    assert mover.state(handle)[0] == "succeeded"


@pytest.mark.parametrize(
    ("vm", "why"),
    [
        (_vm(state="stopped"), "vm web-1 is stopped"),
        (_vm(runtime={"qemu.accel": "kvm"}), "-cpu host and n2 does not fit"),
    ],
)
async def test_live_mover_moves_cold_what_cannot_migrate(vm: Vm, why: str) -> None:
    ctx = await _cluster(vm)
    mover = LiveMover(ctx)
    assert why in (mover.live_reason(vm, "n2") or "")
    handle = await mover.start(vm.name, "n2", "rebalance")
    assert handle.startswith("cold:")
    moved = ctx.vm(vm.name)
    assert moved is not None and moved.status.node == "n2" and moved.status.epoch == 4
    assert ctx.migration(vm.name) is None
    assert vm.name in _alloc(ctx, "n2") and vm.name not in _alloc(ctx, "n1")


async def test_a_vm_being_deleted_is_never_moved() -> None:
    ctx = await _cluster(_vm(deleting=True))
    for mover in (LiveMover(ctx), RelocatingMover(ctx)):
        with pytest.raises(Conflict, match="being deleted"):
            await mover.start("web-1", "n2", "drain of n1")
    vm = ctx.vm("web-1")
    assert vm is not None and vm.status.node == "n1"
    assert ctx.migration("web-1") is None


async def _migration(ctx: LeaderContext, phase: str) -> Migration:
    vm = ctx.vm("web-1")
    assert vm is not None
    m, task, _, _ = migration_records(vm, "n2", MigrationOptions(), [], "test", None, actor="t")
    m.status.phase = phase  # type: ignore[assignment]
    await ctx.commit([Objects.put(m), Objects.put(task)])
    found = ctx.migration("web-1")
    assert found is not None
    return found


async def test_switch_over_moves_the_allocation_in_the_same_transaction() -> None:
    ctx = await _cluster(_vm(state="migrating"), _vm("other"))
    m = await _migration(ctx, "migrating")
    m.status.source = MigrationReport(
        id=m.id, role="source", status="completed", downtime_ms=12, total_time_ms=345
    )
    await _put(ctx, m)

    await MigrationLoop(ctx).reconcile("web-1")

    vm = ctx.vm("web-1")
    assert vm is not None and vm.status.node == "n2" and vm.status.epoch == 4
    assert _alloc(ctx, "n1") == {"other": (1, 256)}
    assert _alloc(ctx, "n2") == {"web-1": (1, 256)}
    task = ctx.task(m.spec.task)
    assert task is not None and task.status.state == "succeeded"
    assert task.status.result is not None and task.status.result["downtime_ms"] == 12
    assert ctx.assignment("n2", "web-1") is not None
    assert ctx.assignment("n1", "web-1") is None


async def test_prepare_refuses_a_target_without_room() -> None:
    ctx = await _cluster(_vm(memory_mib=512), target_memory=256)
    m = await _migration(ctx, "pending")

    await MigrationLoop(ctx).reconcile("web-1")

    after = ctx.migration("web-1")
    assert after is not None and after.status.phase == "failed"
    assert "memory would be 512 of 256 MiB" in after.status.message
    task = ctx.task(m.spec.task)
    assert task is not None and task.status.state == "failed"
    assert ctx.assignment("n2", "web-1") is None


async def test_cordoned_target_is_refused_at_prepare() -> None:
    ctx, _ = _ctx()
    await _put(ctx, _node("n1"), _node("n2", cordoned=True), _vm())
    await _migration(ctx, "pending")
    await MigrationLoop(ctx).reconcile("web-1")
    after = ctx.migration("web-1")
    assert after is not None and after.status.phase == "failed"
    assert after.status.message == "target host n2 is cordoned"


@pytest.mark.parametrize(
    ("observed_epoch", "started", "forgotten"),
    [
        (2, False, True),  # moved to n1 at epoch 3; n1 only ever saw epoch 2 (on its old host)
        (None, False, True),  # placed, deleted before any host reported it
        (3, True, False),  # n1 runs it: wait for n1 to report it gone
        (None, True, False),  # reported before epochs were recorded: wait as before
    ],
)
async def test_delete_forgets_a_vm_its_host_never_reported(
    observed_epoch: int | None, started: bool, forgotten: bool
) -> None:
    vm = _vm(deleting=True)
    vm.status.observed_epoch = observed_epoch
    if started:
        vm.status.started_at = utcnow()
        vm.status.observed_generation = 1
    ctx = await _cluster(vm)
    loop = VmLoop(ctx, placer=None)  # type: ignore[arg-type]

    await loop.reconcile("web-1")

    assert (ctx.vm("web-1") is None) == forgotten


async def test_a_kvm_guest_moves_live_to_a_host_with_every_cpu_feature_of_its_own() -> None:
    vm = _vm(runtime={"qemu.accel": "kvm"})
    ctx = await _cluster(vm)
    cpu = HostCpu(vendor="GenuineIntel", model="Xeon", features=["avx2", "sse4.2"])
    for name, features in (("n1", cpu.features), ("n2", [*cpu.features, "avx512f"])):
        cached = ctx.node(name)
        assert cached is not None
        node = cached.model_copy(deep=True)  # the context's own copy is never mutated
        assert node.status.inventory is not None
        node.status.inventory.cpu = cpu.model_copy(update={"features": features})
        await _put(ctx, node)
    mover = LiveMover(ctx)
    assert mover.live_reason(vm, "n2") is None
    handle = await mover.start(vm.name, "n2", "rebalance")
    assert handle.startswith("live:")
    migration = ctx.migration(vm.name)
    assert migration is not None and migration.spec.cpu is not None
    assert migration.spec.cpu.features == cpu.features  # what the target checks against


async def _pending_and_heartbeat(cordon: bool) -> tuple[LeaderContext, MiniStore, ApplyOutcome]:
    ctx, store = _ctx()
    await _put(ctx, _node("n1"), _node("n2"))
    vm = _vm("new-1", state="pending").model_copy(deep=True)
    vm.status.node, vm.status.epoch = None, 0
    await _put(ctx, vm)
    cached = ctx.peek(Node, "n2")
    assert cached is not None
    beat = cached.model_copy(deep=True)  # a heartbeat (or a cordon) the watch has not brought
    beat.status.heartbeat_at = utcnow()
    beat.spec.cordoned = cordon
    store.write_behind_the_cache(beat)
    placing = ctx.peek(Vm, "new-1")
    assert placing is not None
    placing = placing.model_copy(deep=True)
    placing.status.node, placing.status.state = "n2", "starting"
    before = store.commits
    result = await PlanApplier(ctx).apply([Placement(placing, "n2")])
    return ctx, store, ApplyOutcome(result.committed, result.refused, store.commits - before)


@dataclass
class ApplyOutcome:
    committed: list[str]
    refused: dict[str, str]
    commits: int


async def test_the_plan_applier_rereads_a_node_its_watch_has_not_caught_up_with() -> None:
    ctx, _, out = await _pending_and_heartbeat(cordon=False)
    assert out.committed == ["new-1"] and out.commits == 1
    placed = ctx.peek(Vm, "new-1")
    assert placed is not None and placed.status.node == "n2"
    assert "new-1" in _alloc(ctx, "n2")


async def test_the_plan_applier_refuses_a_node_cordoned_behind_its_back() -> None:
    _, _, out = await _pending_and_heartbeat(cordon=True)
    assert out.committed == [] and "cordoned" in out.refused["new-1"] and out.commits == 0
