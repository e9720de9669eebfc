"""The node agent: keeps this host registered and alive, and its VMs matching its assignments.

``NodeAgent.run()`` runs three loops until cancelled or ``shutdown()``:

- liveness: ``register`` the node, open the liveness lease and keep it alive every ttl/3; a
  keepalive answering 0 (or no successful keepalive for a whole ttl) opens a new lease;
- assignments: consume ``node_service.assignments(node)`` (each item is the full desired set);
- reconcile: first ``driver.recover()`` and report what survived, then one pass per new
  desired set, per finished VM operation and every ``resync_s``.

A pass diffs desired vs actual (``corral.agent.reconcile``), reports any observation that
changed since it was last reported (a crash), reports ``starting`` / ``stopping`` for the work
it is about to do, and hands each VM's plan to its own worker task. Workers run at most
``max_parallel`` at a time and never two on one VM (a busy VM is left out of the next passes
until its worker ends). A driver failure marks that VM ``failed`` with the error message and is
retried with exponential backoff, or at once when the VM's intent changes; other VMs go on.

A VM that went down on its own (crashed, or its guest powered off) is started again only when
its restart policy allows (see ``corral.agent.reconcile``), and restarts are spaced out: the
n-th restart of a streak waits ``restart_initial_s * 2**(n-1)`` (at most ``restart_max_s``) after
the VM was seen down, and a VM that ran ``restart_reset_s`` since its last restart starts a new
streak. Until then, the VM's message says what happened and when the next restart is; a VM its
policy leaves down says so and how to start it. The streak lives in this process: a restarted
agent starts a new one.

Server failures never end the agent: every call to the NodeService is retried with backoff.
Running VMs are never stopped by the agent stopping.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from urllib.parse import urlsplit

from corral.agent.drivers.base import Driver, DriverBoot, DriverDisk, DriverVm
from corral.agent.migrations import AgentMigrations, Migrator
from corral.agent.nodeapi import NodeService
from corral.agent.reconcile import HeldVm, VmPlan, diff_vms, hardware_changed, plan_actions
from corral.agent.storage import HostStorage
from corral.errors import CorralError, DriverError
from corral.model import Assignment, Inventory, VmObservation, utcnow
from corral.model.assignment import (
    ALLOCATING_DISKS,
    STARTING_HYPERVISOR,
    AssignedDisk,
    ObservedState,
)
from corral.model.migration import MigrationReport

__all__ = ["NodeAgent"]

log = logging.getLogger(__name__)

_OBSERVED: dict[str, ObservedState] = {
    "running": "running",
    "stopped": "stopped",
    "crashed": "crashed",
    "paused": "paused",
}
_SETTLE_S = 0.02
PENDING_HARDWARE_MESSAGE = "hardware changes take effect at the next start"


class _Backoff:
    """Exponential backoff with jitter (hundreds of hosts must not retry in lockstep)."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._attempts = 0

    def next(self) -> float:
        delay = min(self._max_s, self._initial_s * 2.0**self._attempts)
        self._attempts = min(self._attempts + 1, 32)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self._attempts = 0


@dataclass
class _Failure:
    """The last failed plan of one VM: reported instead of the driver's view until it clears."""

    key: tuple[object, ...]
    observation: VmObservation
    attempts: int
    retry_at: float


@dataclass
class _Restarts:
    """The automatic restarts of one VM in its current streak (see the module docstring)."""

    # (vm_id, epoch, power generation): a new power request or placement starts a new streak.
    key: tuple[str, int, int]
    count: int = 0
    # When the VM was first seen down since the last restart (loop time), and when it may
    # restart; None while it is not waiting.
    down_at: float | None = None
    due_at: float = 0.0
    waiting_note: str = ""
    last_at: float | None = None
    last_note: str = ""


def _restart_key(a: Assignment) -> tuple[str, int, int]:
    return (a.vm_id, a.epoch, a.power_generation or a.generation)


def _seconds(delay: float) -> str:
    return f"{round(delay, 2):g} s"


def _clock(at: datetime) -> str:
    return at.strftime("%H:%M:%SZ")


def _held_note(held: HeldVm) -> str:
    """Why a VM that went down stays down, and what the user can do about it."""
    policy = held.assignment.spec.restart_policy
    why = f"restart policy {policy}"
    if policy == "on-failure":
        why += " restarts only after a crash"
    return f"not restarted ({why}); start it with `corral vm start {held.assignment.vm}`"


def _join(message: str, note: str) -> str:
    if not note:
        return message
    return f"{message}; {note}" if message else note


def _plan_key(plan: VmPlan) -> tuple[object, ...]:
    """What a plan tries to reach; a failure is retried at once when this changes."""
    a = plan.assignment
    if a is None:
        cur = plan.current
        assert cur is not None
        return ("destroy", cur.vm_id, cur.epoch)
    return ("apply", a.vm_id, a.epoch, a.generation, a.reboot_generation, a.spec.power_state)


def _error_message(exc: Exception) -> str:
    if isinstance(exc, CorralError):
        return exc.detail
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _aclose(stream: object) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception as exc:  # closing a broken stream must not hide why it broke
        log.debug("closing the assignment stream failed: %s", exc)


class NodeAgent:
    """The agent of one host. Construct it, ``await run()``, and ``await shutdown()`` to stop.

    ``run()`` returns only after ``shutdown()`` or when cancelled; it never raises because the
    servers or the driver fail. ``last_pass_summary`` is the sentence of the last pass.
    """

    def __init__(
        self,
        node_name: str,
        node_service: NodeService,
        driver: Driver,
        *,
        address: str,
        labels: Mapping[str, str],
        roles: Sequence[str],
        inventory: Inventory,
        lease_ttl_s: int = 15,
        resync_s: float = 5.0,
        keepalive_s: float | None = None,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
        max_parallel: int = 8,
        stop_timeout_s: float = 60.0,
        storage: HostStorage | None = None,
        inventory_refresh: Callable[[Mapping[str, str]], Inventory] | None = None,
        inventory_every_s: float = 60.0,
        restart_initial_s: float = 1.0,
        restart_max_s: float = 300.0,
        restart_reset_s: float = 600.0,
        migrator: Migrator | None = None,
        migration_host: str | None = None,
    ) -> None:
        """``keepalive_s`` defaults to ``lease_ttl_s / 3``. ``retry_initial_s`` and
        ``retry_max_s`` bound the backoff of server calls and of failed VM operations.
        ``max_parallel`` bounds concurrent VM operations; ``stop_timeout_s`` is the graceful
        stop's wait before power-off. ``restart_initial_s``, ``restart_max_s`` and
        ``restart_reset_s`` shape the crash-loop backoff of automatic restarts."""
        if lease_ttl_s < 1:
            raise ValueError("lease_ttl_s: must be >= 1")
        if max_parallel < 1:
            raise ValueError("max_parallel: must be >= 1")
        self.node_name = node_name
        self._ns = node_service
        self._driver = driver
        self._address = address
        self._labels = dict(labels)
        self._roles = list(roles)
        self._inventory = inventory
        self._lease_ttl_s = lease_ttl_s
        self._resync_s = resync_s
        self._keepalive_s = keepalive_s if keepalive_s is not None else lease_ttl_s / 3
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._stop_timeout_s = stop_timeout_s
        self._storage = storage
        self._inventory_refresh = inventory_refresh
        self._inventory_every_s = inventory_every_s
        self._restart_initial_s = restart_initial_s
        self._restart_max_s = restart_max_s
        self._restart_reset_s = restart_reset_s
        self._sem = asyncio.Semaphore(max_parallel)

        self.last_pass_summary = ""
        self._lease_id: int | None = None
        self._desired: dict[str, Assignment] | None = None
        self._last_reported: dict[str, VmObservation] = {}
        self._failures: dict[str, _Failure] = {}
        self._restarts: dict[str, _Restarts] = {}
        # What this pass adds to the message of a VM that is down (held, or waiting to restart).
        self._notes: dict[str, str] = {}
        self._busy: dict[str, asyncio.Task[None]] = {}
        self._pending_gone: dict[tuple[str, str], int] = {}
        self._registered = asyncio.Event()
        self._inventory_due = 0.0
        self._watching = False
        self._wake = asyncio.Event()
        self._done = asyncio.Event()
        self._pass_lock = asyncio.Lock()
        self._loops: list[asyncio.Task[None]] = []
        # Live migrations (see ``corral.agent.migrations``); traffic binds to this host's own
        # address (the one its API listens on, unless given).
        host = migration_host or urlsplit(address).hostname or "127.0.0.1"
        self._migrations = AgentMigrations(
            node_name,
            migrator,
            host,
            self._publish_migration,
            self._define_for_migration,
            self._wake.set,
        )

    # -- public -----------------------------------------------------------------------------

    @property
    def lease_id(self) -> int | None:
        """The liveness lease currently kept alive, None before one is open."""
        return self._lease_id

    async def run(self) -> None:
        """Run the liveness, assignment and reconcile loops until ``shutdown()`` or cancel.

        Cancelling stops everything at once (VM operations in flight are cancelled too) and
        leaves the lease to expire; ``shutdown()`` is the graceful way.
        """
        if self._loops:
            raise RuntimeError("NodeAgent.run() is already running")
        if not self._watching:
            # A guest that powers off, resets or dies: look at once, not at the next resync.
            self._driver.watch(lambda _name: self._wake.set())
            self._watching = True
        self._done.clear()
        self._registered.clear()  # register again: the record may have changed while we were off
        self._loops = [
            asyncio.create_task(self._liveness_loop(), name=f"agent-{self.node_name}-liveness"),
            asyncio.create_task(
                self._assignment_loop(), name=f"agent-{self.node_name}-assignments"
            ),
            asyncio.create_task(self._reconcile_loop(), name=f"agent-{self.node_name}-reconcile"),
        ]
        try:
            await self._done.wait()
        finally:
            if not self._done.is_set():
                await self._cancel_loops()
                await self._finish_workers(timeout_s=0.0)

    async def shutdown(self, *, revoke_lease: bool = False, timeout_s: float = 30.0) -> None:
        """Stop the loops, let VM operations in flight finish (cancelled after ``timeout_s``),
        and make ``run()`` return. VMs keep running.

        ``revoke_lease=True`` (the node leaves, or the operator stops it cleanly) revokes the
        liveness lease so the node turns not-ready at once; otherwise the lease simply expires
        unless a restarted agent keeps it alive. Never raises for server failures.
        """
        await self._cancel_loops()
        await self._finish_workers(timeout_s=timeout_s)
        if revoke_lease and self._lease_id is not None:
            try:
                await self._ns.close_liveness(self.node_name, self._lease_id)
                log.info("node %s: revoked liveness lease %x", self.node_name, self._lease_id)
            except Exception as exc:  # the lease expires by itself anyway
                log.warning("node %s: cannot revoke liveness lease: %s", self.node_name, exc)
            self._lease_id = None
        self._done.set()

    # -- loops ------------------------------------------------------------------------------

    async def _cancel_loops(self) -> None:
        loops, self._loops = self._loops, []
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await self._migrations.close()

    async def _finish_workers(self, *, timeout_s: float) -> None:
        workers = list(self._busy.values())
        if not workers:
            return
        pending: set[asyncio.Task[None]] = set(workers)
        if timeout_s > 0:
            _, pending = await asyncio.wait(workers, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    async def _liveness_loop(self) -> None:
        backoff = _Backoff(self._retry_initial_s, self._retry_max_s)
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while True:
            try:
                if not self._registered.is_set():
                    await self._ns.register(
                        self.node_name,
                        address=self._address,
                        driver=self._driver.name,
                        inventory=self._inventory,
                        labels=dict(self._labels),
                        roles=list(self._roles),
                    )
                    log.info("node %s: registered at %s", self.node_name, self._address)
                    self._registered.set()
                if self._lease_id is None:
                    self._lease_id = await self._ns.open_liveness(self.node_name, self._lease_ttl_s)
                    last_ok = loop.time()
                    backoff.reset()
                    log.info(
                        "node %s: opened liveness lease %x (ttl %d s)",
                        self.node_name,
                        self._lease_id,
                        self._lease_ttl_s,
                    )
                await asyncio.sleep(self._keepalive_s)
                await self._refresh_inventory()
                remaining = await self._ns.keepalive(self.node_name, self._lease_id)
                if remaining <= 0:
                    log.warning(
                        "node %s: liveness lease %x expired; opening a new one",
                        self.node_name,
                        self._lease_id,
                    )
                    self._lease_id = None
                    continue
                last_ok = loop.time()
                backoff.reset()
            except Exception as exc:  # the servers are unreachable: never crash, retry
                if self._lease_id is not None and loop.time() - last_ok > self._lease_ttl_s:
                    # No keepalive got through for a whole ttl: that lease is gone.
                    self._lease_id = None
                delay = backoff.next()
                log.warning(
                    "node %s: cannot reach the servers (%s); retrying in %.1f s",
                    self.node_name,
                    _error_message(exc),
                    delay,
                )
                await asyncio.sleep(delay)

    async def _refresh_inventory(self) -> None:
        """Every ``inventory_every_s``: measure again (pools fill up); register again when
        something changed (the record then shows it)."""
        loop = asyncio.get_running_loop()
        if self._inventory_refresh is None or loop.time() < self._inventory_due:
            return
        self._inventory_due = loop.time() + self._inventory_every_s
        pools = {
            d.pool: d.pool_path
            for a in (self._desired or {}).values()
            for d in a.disks
            if d.pool_path
        }
        try:
            fresh = await asyncio.to_thread(self._inventory_refresh, pools)
        except OSError as exc:
            log.warning("node %s: cannot measure the host: %s", self.node_name, exc)
            return
        if fresh != self._inventory:
            self._inventory = fresh
            await self._ns.register(
                self.node_name,
                address=self._address,
                driver=self._driver.name,
                inventory=self._inventory,
                labels=dict(self._labels),
                roles=list(self._roles),
            )

    async def _assignment_loop(self) -> None:
        await self._registered.wait()
        backoff = _Backoff(self._retry_initial_s, self._retry_max_s)
        while True:
            stream: AsyncIterator[dict[str, Assignment]] | None = None
            try:
                stream = self._ns.assignments(self.node_name)
                async for desired in stream:
                    self._desired = dict(desired)
                    self._wake.set()
                    backoff.reset()
                log.warning("node %s: assignment stream ended; subscribing again", self.node_name)
            except Exception as exc:  # re-subscribe: the stream re-lists the full set
                log.warning(
                    "node %s: assignment stream failed: %s", self.node_name, _error_message(exc)
                )
            finally:
                if stream is not None:
                    await _aclose(stream)
            await asyncio.sleep(backoff.next())

    async def _recover(self) -> list[DriverVm]:
        backoff = _Backoff(self._retry_initial_s, self._retry_max_s)
        while True:
            try:
                fingerprint = await self._driver.fingerprint()
                vms = await self._driver.recover()
            except Exception as exc:  # without recovery nothing else is safe to do
                delay = backoff.next()
                log.error(
                    "node %s: driver %s cannot recover its vms: %s; retrying in %.1f s",
                    self.node_name,
                    self._driver.name,
                    _error_message(exc),
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            running = sum(1 for vm in vms if vm.state == "running")
            log.info(
                "node %s: driver %s %s recovered %d vms (%d running)",
                self.node_name,
                self._driver.name,
                fingerprint,
                len(vms),
                running,
            )
            return vms

    async def _reconcile_loop(self) -> None:
        recovered = await self._recover()
        await self._registered.wait()
        await self._report([self._observe(vm) for vm in recovered])
        backoff = _Backoff(self._retry_initial_s, self._retry_max_s)
        while True:
            try:
                async with asyncio.timeout(self._resync_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            # Let a burst of changes (a thousand VMs created at once) settle into one pass:
            # each pass looks at every VM on the host.
            await asyncio.sleep(_SETTLE_S)
            self._wake.clear()
            try:
                await self._pass()
                backoff.reset()
            except Exception as exc:  # e.g. the driver cannot list: try again later
                delay = backoff.next()
                log.warning(
                    "node %s: reconcile pass failed: %s; retrying in %.1f s",
                    self.node_name,
                    _error_message(exc),
                    delay,
                )
                await asyncio.sleep(delay)

    # -- one pass ---------------------------------------------------------------------------

    async def _pass(self) -> None:
        """Decide, report changes and progress, and start one worker per VM plan."""
        async with self._pass_lock:
            loop = asyncio.get_running_loop()
            # Taken before listing, so a VM whose worker ends meanwhile waits for the next pass.
            busy = set(self._busy)
            await self._retry_gone()
            actual = {vm.name: vm for vm in await self._driver.list() if vm.name not in busy}
            desired = self._desired
            sentences: list[str] = []
            to_run: list[VmPlan] = []
            notes: dict[str, str] = {}
            if desired is not None:
                # VMs in a live migration are driven by the migration workers only.
                owned = self._migrations.owned(desired)
                wanted = {name: a for name, a in desired.items() if name not in busy | owned}
                diff = diff_vms(wanted, {n: v for n, v in actual.items() if n not in owned})
                sentences.extend(ig.reason for ig in diff.ignored)
                for held in diff.held:
                    notes[held.assignment.vm] = _held_note(held)
                    sentences.append(held.reason)
                for name in (*diff.unchanged, *(h.assignment.vm for h in diff.held)):
                    self._failures.pop(name, None)
                for name in list(self._restarts):
                    if name not in desired:
                        del self._restarts[name]
                for name in list(self._failures):
                    if name not in wanted and name not in actual and name not in busy:
                        del self._failures[name]
                for plan in plan_actions(diff):
                    failure = self._failures.get(plan.vm)
                    if failure is not None and failure.key != _plan_key(plan):
                        del self._failures[plan.vm]  # new intent: try again at once
                    elif failure is not None and loop.time() < failure.retry_at:
                        sentences.append(
                            f"retrying vm {plan.vm} in {failure.retry_at - loop.time():.1f} s "
                            f"after: {failure.observation.message}"
                        )
                        continue
                    if plan.restart:
                        waiting = self._restart_wait(plan, loop.time())
                        if waiting is not None:
                            notes[plan.vm] = waiting
                            sentences.append(f"vm {plan.vm}: {waiting}")
                            continue
                    to_run.append(plan)
                    sentences.append(plan.sentence)
            self._notes = notes

            await self._report(self._changed_observations(actual, busy))
            await self._report(
                [p for plan in to_run if (p := self._progress(plan, self._restarts)) is not None]
            )
            for plan in to_run:
                self._busy[plan.vm] = asyncio.create_task(self._work(plan), name=f"vm-{plan.vm}")

            summary = "; ".join(sentences)
            if desired is None:
                summary = f"waiting for the first assignments: {len(actual)} vms here"
            elif not summary:
                summary = f"nothing to do: {len(actual)} vms as desired"
                if busy:
                    summary += f", {len(busy)} in progress"
            level = logging.INFO if to_run or summary != self.last_pass_summary else logging.DEBUG
            log.log(level, "node %s: %s", self.node_name, summary)
            self.last_pass_summary = summary

    def _restart_wait(self, plan: VmPlan, now: float) -> str | None:
        """Gate an automatic restart by the crash-loop backoff: None when it may run now (it
        is then counted), else the note saying which restart comes when. Schedules a pass
        for the moment it is due."""
        a, cur = plan.assignment, plan.current
        assert a is not None and cur is not None
        key = _restart_key(a)
        r = self._restarts.get(plan.vm)
        if r is None or r.key != key:
            r = self._restarts[plan.vm] = _Restarts(key)
        policy = a.spec.restart_policy
        if r.down_at is None:
            if r.last_at is not None and now - r.last_at >= self._restart_reset_s:
                r.count = 0  # it ran long enough: this is not a crash loop
            delay = min(self._restart_max_s, self._restart_initial_s * 2.0**r.count)
            r.down_at, r.due_at = now, now + delay
            r.waiting_note = f"restart {r.count + 1} in {_seconds(delay)} (policy {policy})"
        if now < r.due_at:
            asyncio.get_running_loop().call_later(r.due_at - now, self._wake.set)
            return r.waiting_note
        r.count += 1
        r.down_at = None
        r.last_at = now
        what = cur.message or f"it {cur.state}"
        r.last_note = f"restart {r.count} at {_clock(utcnow())} after: {what} (policy {policy})"
        return None

    def _restart_note(self, vm: DriverVm) -> str:
        """The last automatic restart of a running VM, while its streak lasts."""
        r = self._restarts.get(vm.name)
        if r is None or r.last_at is None or vm.state == "crashed" or vm.state == "stopped":
            return ""
        if asyncio.get_running_loop().time() - r.last_at >= self._restart_reset_s:
            return ""
        return r.last_note

    def _observe(self, vm: DriverVm) -> VmObservation:
        failure = self._failures.get(vm.name)
        if failure is not None and failure.observation.vm_id == vm.vm_id:
            return failure.observation
        note = self._notes.get(vm.name) or self._restart_note(vm)
        message = _join(vm.message, note)
        return VmObservation(
            vm=vm.name,
            vm_id=vm.vm_id,
            epoch=vm.epoch,
            state=_OBSERVED[vm.state],
            observed_generation=vm.applied_generation,
            started_at=vm.started_at,
            message=message,
            runtime=dict(vm.extra),
            volumes={d.id: d.path for d in vm.disks if d.id},
            migration=self._migrations.reports.get(vm.name),
        )

    def _changed_observations(
        self, actual: Mapping[str, DriverVm], busy: set[str]
    ) -> list[VmObservation]:
        current = [self._observe(vm) for vm in actual.values()]
        # A VM that failed to be defined has no driver record but must still be seen failed.
        current.extend(
            f.observation
            for name, f in self._failures.items()
            if name not in actual and name not in busy
        )
        return [obs for obs in current if self._last_reported.get(obs.vm) != obs]

    @staticmethod
    def _progress(plan: VmPlan, restarts: Mapping[str, _Restarts]) -> VmObservation | None:
        """``starting`` / ``stopping`` for a plan that boots or stops its VM, else None."""
        a = plan.assignment
        if a is None or not ({"start", "stop"} & set(plan.steps)):
            return None
        cur = plan.current if plan.current is not None and plan.current.vm_id == a.vm_id else None
        stopping = "stop" in plan.steps
        return VmObservation(
            vm=plan.vm,
            vm_id=a.vm_id,
            epoch=a.epoch,
            state="stopping" if stopping else "starting",
            observed_generation=cur.applied_generation if cur is not None else 0,
            started_at=cur.started_at if cur is not None and stopping else None,
            message=(
                r.last_note
                if plan.restart and (r := restarts.get(plan.vm))
                else ALLOCATING_DISKS
                if "define" in plan.steps and a.disks
                else ""
            ),
        )

    # -- one VM -----------------------------------------------------------------------------

    async def _work(self, plan: VmPlan) -> None:
        try:
            async with self._sem:
                observation, gone = await self._execute(plan)
            for vm_id, epoch in gone:
                await self._send_gone(plan.vm, vm_id, epoch)
            if observation is not None:
                await self._report([observation])
        finally:
            self._busy.pop(plan.vm, None)
            self._wake.set()  # a desired set that arrived meanwhile is applied by the next pass

    async def _execute(self, plan: VmPlan) -> tuple[VmObservation | None, list[tuple[str, int]]]:
        """Run the plan's steps in order. Returns the observation to report (None once the
        VM is gone) and the (vm_id, epoch) of every VM destroyed. Never raises: a failure is
        recorded and reported as ``failed``."""
        name, a = plan.vm, plan.assignment
        vm = plan.current
        gone: list[tuple[str, int]] = []
        step = "plan"
        try:
            for step in plan.steps:
                vm = await self._step(step, plan, vm)
                if step == "destroy":
                    assert plan.current is not None
                    gone.append((plan.current.vm_id, plan.current.epoch))
                    self._last_reported.pop(name, None)
        except Exception as exc:  # one VM's failure must not stop work on the others
            return self._record_failure(plan, step, vm, exc), gone
        self._failures.pop(name, None)
        if a is None or vm is None:
            return None, gone
        log.info(
            "node %s: vm %s is %s (generation %d)",
            self.node_name,
            name,
            vm.state,
            vm.applied_generation,
        )
        return self._observe(vm), gone

    async def _step(self, step: str, plan: VmPlan, vm: DriverVm | None) -> DriverVm | None:
        """Apply one step through the driver; returns the VM as the driver now sees it."""
        name, a = plan.vm, plan.assignment
        if step == "destroy":
            await self._driver.destroy(name)
            return None
        if a is None:
            raise RuntimeError(f"plan step {step} of vm {name} needs an assignment")
        if step == "define":
            disks = [await self._volume(d) for d in a.disks]
            if disks and "start" in plan.steps:
                note = VmObservation(
                    vm=name,
                    vm_id=a.vm_id,
                    epoch=a.epoch,
                    state="starting",
                    observed_generation=0,
                    message=STARTING_HYPERVISOR,
                )
                await self._report([note])
            return await self._driver.define(
                DriverVm(
                    name=name,
                    vm_id=a.vm_id,
                    epoch=a.epoch,
                    spec=a.spec.model_copy(deep=True),
                    state="stopped",
                    disks=tuple(disks),
                    boot=await self._boot(a),
                )
            )
        if vm is None:
            raise RuntimeError(f"plan step {step} of vm {name} needs a defined vm")
        if step == "update":
            vm = await self._sync_disks(vm, a)
            message = vm.message
            keeps_running = vm.state == "running" and not {"start", "stop"} & set(plan.steps)
            if keeps_running and hardware_changed(vm.spec, a.spec):
                message = PENDING_HARDWARE_MESSAGE
            return await self._driver.update(
                name, replace(vm, epoch=a.epoch, spec=a.spec.model_copy(deep=True), message=message)
            )
        if step == "start":
            return await self._driver.start(name)
        if step == "stop":
            return await self._driver.stop(name, timeout_s=self._stop_timeout_s)
        if step == "reboot":
            return await self._driver.reboot(name)
        if step == "pause":
            return await self._driver.pause(name)
        if step == "resume":
            return await self._driver.resume(name)
        if step == "record":
            if (vm.applied_generation, vm.reboot_generation) == (a.generation, a.reboot_generation):
                return vm
            return await self._driver.update(
                name,
                replace(
                    vm,
                    applied_generation=a.generation,
                    reboot_generation=max(vm.reboot_generation, a.reboot_generation),
                ),
            )
        raise RuntimeError(f"unknown plan step {step!r}")

    async def _volume(self, disk: AssignedDisk) -> DriverDisk:
        """The disk's file on this host, created now if it never existed anywhere."""
        if self._storage is None:
            raise DriverError(f"volume {disk.volume}: this host has no storage configured")
        path = await self._storage.ensure_volume(disk)
        return DriverDisk(id=disk.volume, path=str(path), format=disk.format)

    async def _boot(self, a: Assignment) -> DriverBoot | None:
        """The image's boot files on this host (fetched if needed); None: the driver's default."""
        boot = a.boot
        if boot is None:
            return None
        if boot.kernel is None:
            return DriverBoot(kernel=None)
        if self._storage is None:
            raise DriverError(f"vm {a.vm}: this host has no storage for image files")
        kernel = await self._storage.image_file(boot.kernel)
        initrd = await self._storage.image_file(boot.initrd) if boot.initrd else None
        return DriverBoot(
            kernel=str(kernel), initrd=str(initrd) if initrd else None, cmdline=boot.cmdline
        )

    async def _sync_disks(self, vm: DriverVm, a: Assignment) -> DriverVm:
        """Hot-plug (or, when stopped, re-define) the disks the assignment added or removed."""
        want = [d.volume for d in a.disks]
        for disk in vm.disks:
            if disk.id and disk.id not in want:
                log.info("node %s: detaching %s from vm %s", self.node_name, disk.id, vm.name)
                vm = await self._driver.detach_disk(vm.name, disk.id)
        have = {d.id for d in vm.disks}
        for assigned in a.disks:
            if assigned.volume not in have:
                log.info("node %s: attaching %s to vm %s", self.node_name, assigned.volume, vm.name)
                vm = await self._driver.attach_disk(vm.name, await self._volume(assigned))
        return vm

    def _record_failure(
        self, plan: VmPlan, step: str, vm: DriverVm | None, exc: Exception
    ) -> VmObservation:
        loop = asyncio.get_running_loop()
        message = _error_message(exc)
        key = _plan_key(plan)
        previous = self._failures.get(plan.vm)
        attempts = previous.attempts + 1 if previous is not None and previous.key == key else 1
        delay = min(self._retry_max_s, self._retry_initial_s * 2.0 ** (attempts - 1))
        if plan.assignment is not None:
            vm_id, epoch = plan.assignment.vm_id, plan.assignment.epoch
        else:
            assert plan.current is not None
            vm_id, epoch = plan.current.vm_id, plan.current.epoch
        same = vm is not None and vm.vm_id == vm_id
        observation = VmObservation(
            vm=plan.vm,
            vm_id=vm_id,
            epoch=epoch,
            state="failed",
            observed_generation=vm.applied_generation if vm is not None and same else 0,
            started_at=vm.started_at if vm is not None and same else None,
            message=message,
        )
        self._failures[plan.vm] = _Failure(key, observation, attempts, loop.time() + delay)
        log.warning(
            "node %s: %s of vm %s failed (attempt %d, retrying in %.1f s): %s",
            self.node_name,
            step,
            plan.vm,
            attempts,
            delay,
            message,
            exc_info=not isinstance(exc, DriverError),  # a driver bug: keep the traceback
        )
        return observation

    # -- live migration ---------------------------------------------------------------------

    async def _publish_migration(self, name: str, report: MigrationReport) -> bool:
        """Report one VM's migration progress now; True once the servers took it."""
        a = (self._desired or {}).get(name)
        try:
            vm = await self._driver.inspect(name)
        except Exception:  # the report matters more than the VM's state here
            vm = None
        if vm is not None:
            obs = self._observe(vm)
            obs = obs.model_copy(update={"migration": report})
        elif a is not None:
            obs = VmObservation(
                vm=name,
                vm_id=a.vm_id,
                epoch=a.epoch,
                state="stopped",
                observed_generation=0,
                migration=report,
            )
        else:
            return True
        return await self._report([obs])

    async def _define_for_migration(self, a: Assignment) -> DriverVm:
        """The VM defined here (stopped) for an incoming migration, its volumes created."""
        current = await self._driver.inspect(a.vm)
        if current is not None:
            if current.vm_id != a.vm_id:
                raise DriverError(
                    f"vm {a.vm}: another vm (id {current.vm_id}) has that name on this host"
                )
            return current
        plan = VmPlan(a.vm, ("define",), a, None, f"defining vm {a.vm} for an incoming migration")
        vm = await self._step("define", plan, None)
        assert vm is not None
        return vm

    # -- reporting --------------------------------------------------------------------------

    async def _report(self, observations: list[VmObservation]) -> bool:
        """Send observations; remembered as reported only when the server took them."""
        if not observations:
            return True
        try:
            await self._ns.report(self.node_name, observations)
        except Exception as exc:  # unreported ones differ from _last_reported: sent next pass
            log.warning(
                "node %s: cannot report %d observations: %s",
                self.node_name,
                len(observations),
                _error_message(exc),
            )
            return False
        for obs in observations:
            self._last_reported[obs.vm] = obs
        return True

    async def _send_gone(self, name: str, vm_id: str, epoch: int) -> None:
        try:
            await self._ns.report_gone(self.node_name, name, vm_id, epoch)
        except Exception as exc:  # the VM is already gone here: keep telling until heard
            log.warning(
                "node %s: cannot report vm %s gone: %s", self.node_name, name, _error_message(exc)
            )
            self._pending_gone[(name, vm_id)] = epoch
        else:
            self._pending_gone.pop((name, vm_id), None)

    async def _retry_gone(self) -> None:
        for (name, vm_id), epoch in list(self._pending_gone.items()):
            await self._send_gone(name, vm_id, epoch)
