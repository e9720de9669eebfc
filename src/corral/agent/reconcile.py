"""The node agent's pure decisions: diff desired vs actual VMs, then plan driver steps.

No I/O and no clock: ``diff_vms`` and ``plan_actions`` take values and return values, so every
case is a row in a table test. The runner (``corral.agent.runner``) only executes the plans.

Rules, per VM name:

- desired, not defined here                     -> ``added``
- defined here, not desired                     -> ``removed``
- both, but a different ``vm_id`` (a new VM that
  reuses the name)                              -> ``replaced`` (destroy old, define new)
- both, assignment epoch older than the VM's, or
  same epoch and generation older than applied  -> ``ignored`` (never run an older placement)
- both, the VM went down on its own and its
  restart policy leaves it down, nothing else
  to do                                         -> ``held``
- both, and something to do                     -> ``updated``
- both, nothing to do                           -> ``unchanged``

"Something to do" is: the runtime state differs from ``spec.power_state``, the generation is
newer than the applied one, ``reboot_generation`` is newer than the applied one, the epoch is
newer, or the spec differs from the stored one.

Power: ``running`` from stopped or crashed is ``start``, from paused ``resume``; ``paused`` from
running is ``pause``, from stopped or crashed ``start`` then ``pause``; ``stopped`` is ``stop``.

Restart policy: a VM that is ``crashed`` or ``stopped`` while it should run (or be paused), on
the epoch it was placed with, although this node already applied its last power request
(``power_generation <= applied_generation``), went down on its own. It is started again only if
``spec.restart_policy`` allows: ``always`` after a crash or a guest poweroff, ``on-failure``
after a crash only, ``never`` not at all. Such a start is a *restart* (``VmPlan.restart``): the
runner spaces restarts out (crash-loop backoff). A newer power request (``vm start``) is a new
intent and always applies. An assignment with ``power_generation`` 0 (written before power
generations existed) counts every generation as a power request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from corral.agent.drivers.base import DriverVm
from corral.model import Assignment, VmSpec
from corral.model.vm import RestartPolicy

__all__ = [
    "ActionKind",
    "HeldVm",
    "IgnoredAssignment",
    "VmDiff",
    "VmPlan",
    "VmReplacement",
    "VmUpdate",
    "diff_vms",
    "hardware_changed",
    "plan_actions",
    "restart_allowed",
    "went_down",
]

# "record" stores the assignment's generation and reboot_generation as applied; it is always
# the last step of a plan that has an assignment, so applied_generation advances only after
# every other step succeeded.
ActionKind = Literal[
    "destroy", "define", "update", "start", "stop", "reboot", "pause", "resume", "record"
]

_VERBS: dict[ActionKind, str] = {
    "destroy": "destroying",
    "define": "defining",
    "update": "updating",
    "start": "starting",
    "stop": "stopping",
    "reboot": "rebooting",
    "pause": "pausing",
    "resume": "resuming",
    "record": "recording",
}


@dataclass(frozen=True)
class VmUpdate:
    """A VM defined here and desired, with something to do; ``reasons`` say what, for logs."""

    assignment: Assignment
    current: DriverVm
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class VmReplacement:
    """The name is desired with a new ``vm_id``; the VM defined here under it must go first."""

    assignment: Assignment
    current: DriverVm


@dataclass(frozen=True)
class IgnoredAssignment:
    """An assignment the agent refuses to act on; ``reason`` is a sentence for the log."""

    assignment: Assignment
    current: DriverVm
    reason: str


@dataclass(frozen=True)
class HeldVm:
    """A VM that went down on its own and that its restart policy leaves down; ``reason`` is a
    sentence for the log."""

    assignment: Assignment
    current: DriverVm
    reason: str


@dataclass(frozen=True)
class VmDiff:
    """Desired vs actual on one node; every tuple is sorted by VM name."""

    added: tuple[Assignment, ...] = ()
    removed: tuple[DriverVm, ...] = ()
    replaced: tuple[VmReplacement, ...] = ()
    updated: tuple[VmUpdate, ...] = ()
    unchanged: tuple[str, ...] = ()
    ignored: tuple[IgnoredAssignment, ...] = ()
    held: tuple[HeldVm, ...] = ()


@dataclass(frozen=True)
class VmPlan:
    """The ordered driver steps for one VM, and the sentence that announces them.

    ``assignment`` is None only for a plain removal; ``current`` is None for a new VM.
    ``restart`` is True when the plan starts a VM that went down on its own (its restart
    policy allows it; the runner decides when).
    """

    vm: str
    steps: tuple[ActionKind, ...]
    assignment: Assignment | None
    current: DriverVm | None
    sentence: str
    restart: bool = False


def hardware_changed(old: VmSpec, new: VmSpec) -> bool:
    """True when the change needs a fresh boot to take effect (labels, power, the restart
    policy and disks, which are hot-plugged, do not)."""
    skip = {"labels", "power_state", "restart_policy", "disks"}
    return old.model_dump(exclude=skip) != new.model_dump(exclude=skip)


def went_down(assignment: Assignment, current: DriverVm) -> bool:
    """True when the VM is down (crashed, or stopped by its guest) although it should run and
    this node already applied the last power request for it: nobody asked it to go down."""
    power_generation = assignment.power_generation or assignment.generation
    return (
        current.state in ("crashed", "stopped")
        and assignment.spec.power_state != "stopped"
        and assignment.epoch == current.epoch
        and assignment.vm_id == current.vm_id
        and power_generation <= current.applied_generation
    )


def restart_allowed(policy: RestartPolicy, state: str) -> bool:
    """Whether ``policy`` restarts a VM that went down on its own and is now ``state``
    (``crashed``: the hypervisor process died or the guest panicked; ``stopped``: the guest
    powered itself off)."""
    if policy == "always":
        return True
    return policy == "on-failure" and state == "crashed"


def _held_reason(assignment: Assignment, current: DriverVm) -> str:
    policy = assignment.spec.restart_policy
    why = f"restart policy {policy}"
    if policy == "on-failure":
        why += " restarts only after a crash"
    return f"leaving vm {assignment.vm} {current.state}: {why}"


def _stale_reason(assignment: Assignment, current: DriverVm) -> str | None:
    name = assignment.vm
    if assignment.epoch < current.epoch:
        return (
            f"ignoring vm {name} assignment with epoch {assignment.epoch}: "
            f"this node runs epoch {current.epoch}"
        )
    if assignment.epoch == current.epoch and assignment.generation < current.applied_generation:
        return (
            f"ignoring vm {name} assignment with generation {assignment.generation}: "
            f"generation {current.applied_generation} is already applied"
        )
    return None


def _update_reasons(
    assignment: Assignment, current: DriverVm, *, power: bool = True
) -> tuple[str, ...]:
    """Why the VM needs work; ``power=False`` leaves out a runtime state that differs."""
    reasons: list[str] = []
    want = assignment.spec.power_state
    if power and current.state != want:
        reasons.append(f"is {current.state}, wanted {want}")
    if assignment.epoch > current.epoch:
        reasons.append(f"epoch {assignment.epoch} is newer than {current.epoch}")
    if assignment.generation > current.applied_generation:
        reasons.append(
            f"generation {assignment.generation} is newer than applied {current.applied_generation}"
        )
    if assignment.reboot_generation > current.reboot_generation:
        reasons.append(f"reboot requested at generation {assignment.reboot_generation}")
    if assignment.spec != current.spec:
        reasons.append("spec changed")
    return tuple(reasons)


def diff_vms(desired: Mapping[str, Assignment], actual: Mapping[str, DriverVm]) -> VmDiff:
    """Classify every VM name of ``desired`` (keyed by VM name) and ``actual`` (the driver's
    VMs by name) as added / removed / replaced / updated / unchanged / ignored."""
    added: list[Assignment] = []
    removed: list[DriverVm] = []
    replaced: list[VmReplacement] = []
    updated: list[VmUpdate] = []
    unchanged: list[str] = []
    ignored: list[IgnoredAssignment] = []
    held: list[HeldVm] = []
    for name in sorted(set(desired) | set(actual)):
        want = desired.get(name)
        have = actual.get(name)
        if want is None:
            assert have is not None
            removed.append(have)
        elif have is None:
            added.append(want)
        elif want.vm_id != have.vm_id:
            replaced.append(VmReplacement(want, have))
        elif (stale := _stale_reason(want, have)) is not None:
            ignored.append(IgnoredAssignment(want, have, stale))
        elif (
            went_down(want, have)
            and not restart_allowed(want.spec.restart_policy, have.state)
            and not _update_reasons(want, have, power=False)
        ):
            held.append(HeldVm(want, have, _held_reason(want, have)))
        elif reasons := _update_reasons(want, have):
            updated.append(VmUpdate(want, have, reasons))
        else:
            unchanged.append(name)
    return VmDiff(
        added=tuple(added),
        removed=tuple(removed),
        replaced=tuple(replaced),
        updated=tuple(updated),
        unchanged=tuple(unchanged),
        ignored=tuple(ignored),
        held=tuple(held),
    )


def _power_steps(assignment: Assignment, state: str) -> tuple[ActionKind, ...]:
    want = assignment.spec.power_state
    if state == want:
        return ()
    if want == "stopped":
        return ("stop",)
    if want == "running":
        return ("resume",) if state == "paused" else ("start",)
    return ("pause",) if state == "running" else ("start", "pause")


def _sentence(name: str, steps: tuple[ActionKind, ...], assignment: Assignment) -> str:
    shown = [s for s in steps if s != "record"]
    if not shown:
        return (
            f"recording generation {assignment.generation} as applied for vm {name} "
            f"(epoch {assignment.epoch})"
        )
    verbs = " and ".join(_VERBS[s] for s in shown)
    return f"{verbs} vm {name} (epoch {assignment.epoch}, generation {assignment.generation})"


def _plan_new(assignment: Assignment) -> tuple[ActionKind, ...]:
    return ("define", *_power_steps(assignment, "stopped"), "record")


def _plan_update(update: VmUpdate) -> VmPlan:
    a, cur = update.assignment, update.current
    steps: list[ActionKind] = []
    if a.epoch != cur.epoch or a.spec != cur.spec:
        steps.append("update")
    power = _power_steps(a, cur.state)
    down = went_down(a, cur)
    restart = down and restart_allowed(a.spec.restart_policy, cur.state)
    if down and not restart:
        power = ()  # the restart policy leaves it down; the rest of the intent still applies
    steps.extend(power)
    # A fresh boot satisfies a reboot request, and a VM kept off has nothing to reboot.
    wants_reboot = a.reboot_generation > cur.reboot_generation
    if wants_reboot and not power and cur.state == "running":
        steps.append("reboot")
    steps.append("record")
    plan_steps = tuple(steps)
    sentence = _sentence(a.vm, plan_steps, a)
    if restart:
        what = "crashed" if cur.state == "crashed" else "powered itself off"
        sentence += f" after it {what} (restart policy {a.spec.restart_policy})"
    elif cur.state == "crashed" and "start" in plan_steps:
        sentence += " after it crashed"
    return VmPlan(a.vm, plan_steps, a, cur, sentence, restart=restart)


def plan_actions(diff: VmDiff) -> list[VmPlan]:
    """One plan per VM that needs work, sorted by VM name. Steps of one plan must run in order;
    plans of different VMs are independent. Unchanged, ignored and held VMs get no plan."""
    plans: list[VmPlan] = []
    for a in diff.added:
        steps = _plan_new(a)
        plans.append(VmPlan(a.vm, steps, a, None, _sentence(a.vm, steps, a)))
    for vm in diff.removed:
        plans.append(
            VmPlan(
                vm.name,
                ("destroy",),
                None,
                vm,
                f"destroying vm {vm.name} (epoch {vm.epoch}): no longer assigned to this node",
            )
        )
    for r in diff.replaced:
        a, cur = r.assignment, r.current
        steps = ("destroy", *_plan_new(a))
        sentence = f"replacing vm {a.vm} (id {cur.vm_id} -> {a.vm_id}): " + _sentence(
            a.vm, steps[1:], a
        )
        plans.append(VmPlan(a.vm, steps, a, cur, sentence))
    plans.extend(_plan_update(u) for u in diff.updated)
    plans.sort(key=lambda p: p.vm)
    return plans
