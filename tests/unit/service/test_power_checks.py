"""Which power actions a VM's state allows, and what the refusal tells the user to do."""

from __future__ import annotations

import pytest

from corral.errors import Conflict
from corral.model import Vm, VmSpec, VmStatus, utcnow
from corral.service.vms import VmService


def _vm(power: str, state: str) -> Vm:
    now = utcnow()
    return Vm(
        name="web-1",
        id="v1",
        created_at=now,
        updated_at=now,
        spec=VmSpec.model_validate({"power_state": power}),
        status=VmStatus.model_validate({"state": state, "node": "n1"}),
    )


START = "start it first with `corral vm start web-1` (POST /api/v1/vms/web-1/start)"


@pytest.mark.parametrize(
    ("power", "state", "action", "refusal"),
    [
        ("running", "running", "pause", None),
        ("paused", "paused", "pause", None),  # idempotent
        ("paused", "paused", "resume", None),
        ("running", "running", "resume", None),  # idempotent: nothing to resume
        ("running", "starting", "pause", None),
        ("paused", "paused", "start", None),  # start resumes
        ("paused", "paused", "stop", None),
        ("running", "crashed", "start", None),
        (
            "stopped",
            "stopped",
            "pause",
            f"vm 'web-1' is stopped (its desired power state); {START}",
        ),
        (
            "stopped",
            "stopped",
            "resume",
            f"vm 'web-1' is stopped (its desired power state); {START}",
        ),
        (
            "stopped",
            "stopped",
            "reboot",
            f"vm 'web-1' is stopped (its desired power state); {START}",
        ),
        ("running", "crashed", "pause", f"vm 'web-1' is crashed; {START}"),
        ("running", "crashed", "resume", f"vm 'web-1' is crashed; {START}"),
        ("running", "stopped", "reboot", f"vm 'web-1' is stopped; {START}"),
        (
            "paused",
            "paused",
            "reboot",
            "vm 'web-1' is paused; resume it first with `corral vm resume web-1`",
        ),
    ],
)
def test_power_actions_allowed_by_state(
    power: str, state: str, action: str, refusal: str | None
) -> None:
    vm = _vm(power, state)
    if refusal is None:
        VmService._check_power(vm, action)
        return
    with pytest.raises(Conflict) as info:
        VmService._check_power(vm, action)
    assert info.value.detail == refusal
