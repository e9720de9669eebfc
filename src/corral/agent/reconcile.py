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
- both, and something to do                     -> ``updated``
- both, nothing to do                           -> ``unchanged``

"Something to do" is: the runtime state differs from ``spec.power_state``, the generation is
newer than the applied one, ``reboot_generation`` is newer than the applied one, the epoch is
newer, or the spec differs from the stored one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from corral.agent.drivers.base import DriverVm
from corral.model import Assignment, VmSpec

__all__ = [
    "ActionKind",
    "IgnoredAssignment",
    "VmDiff",
    "VmPlan",
    "VmReplacement",
    "VmUpdate",
    "diff_vms",
    "hardware_changed",
    "plan_actions",
]

# "record" stores the assignment's generation and reboot_generation as applied; it is always
# the last step of a plan that has an assignment, so applied_generation advances only after
# every other step succeeded.
ActionKind = Literal["destroy", "define", "update", "start", "stop", "reboot", "record"]

_VERBS: dict[ActionKind, str] = {
    "destroy": "destroying",
    "define": "defining",
    "update": "updating",
    "start": "starting",
    "stop": "stopping",
    "reboot": "rebooting",
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
class VmDiff:
    """Desired vs actual on one node; every tuple is sorted by VM name."""

    added: tuple[Assignment, ...] = ()
    removed: tuple[DriverVm, ...] = ()
    replaced: tuple[VmReplacement, ...] = ()
    updated: tuple[VmUpdate, ...] = ()
    unchanged: tuple[str, ...] = ()
    ignored: tuple[IgnoredAssignment, ...] = ()


@dataclass(frozen=True)
class VmPlan:
    """The ordered driver steps for one VM, and the sentence that announces them.

    ``assignment`` is None only for a plain removal; ``current`` is None for a new VM.
    """

    vm: str
    steps: tuple[ActionKind, ...]
    assignment: Assignment | None
    current: DriverVm | None
    sentence: str


def hardware_changed(old: VmSpec, new: VmSpec) -> bool:
    """True when the change needs a fresh boot to take effect (labels, power and disks, which
    are hot-plugged, do not)."""
    skip = {"labels", "power_state", "disks"}
    return old.model_dump(exclude=skip) != new.model_dump(exclude=skip)


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


def _update_reasons(assignment: Assignment, current: DriverVm) -> tuple[str, ...]:
    reasons: list[str] = []
    want = assignment.spec.power_state
    if current.state != want:
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
    )


def _power_steps(assignment: Assignment, state: str) -> tuple[ActionKind, ...]:
    want = assignment.spec.power_state
    if state == want:
        return ()
    return ("start",) if want == "running" else ("stop",)


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
    steps.extend(power)
    # A fresh boot satisfies a reboot request, and a VM kept off has nothing to reboot.
    wants_reboot = a.reboot_generation > cur.reboot_generation
    if wants_reboot and not power and cur.state == "running":
        steps.append("reboot")
    steps.append("record")
    plan_steps = tuple(steps)
    sentence = _sentence(a.vm, plan_steps, a)
    if cur.state == "crashed" and "start" in plan_steps:
        sentence += " after it crashed"
    return VmPlan(a.vm, plan_steps, a, cur, sentence)


def plan_actions(diff: VmDiff) -> list[VmPlan]:
    """One plan per VM that needs work, sorted by VM name. Steps of one plan must run in order;
    plans of different VMs are independent. Unchanged and ignored VMs get no plan."""
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
