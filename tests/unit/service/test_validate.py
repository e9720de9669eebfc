from __future__ import annotations

from typing import Any

import pytest

from corral.errors import ValidationFailed
from corral.model import VmCreate
from corral.service.validate import parse


@pytest.mark.parametrize(
    ("body", "field", "rule", "message"),
    [
        ({"name": "a", "memory_mib": -5}, "memory_mib", "ge", "must be >= 64"),
        ({"name": "a", "memory_mib": "512"}, "memory_mib", "type", "must be an integer, got str"),
        ({"name": "a", "vcpus": 1000}, "vcpus", "le", "must be <= 256"),
        ({"name": "a" * 300}, "name", "max-length", "at most 63 characters"),
        ({"name": "Web_1"}, "name", "format", "must be a DNS label"),
        ({"name": "a", "colour": "red"}, "colour", "unknown-field", "unknown field"),
        ({}, "name", "required", "is required"),
        ({"name": "a", "power_state": "on"}, "power_state", "one-of", "must be one of"),
        (
            {"name": "a", "restart_policy": "sometimes"},
            "restart_policy",
            "one-of",
            "must be one of 'always', 'on-failure' or 'never'",
        ),
        ({"name": "a", "labels": {"bad key!": "x"}}, "labels", "format", "label key"),
    ],
)
def test_errors_name_the_field_and_the_rule(
    body: dict[str, Any], field: str, rule: str, message: str
) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse(VmCreate, body)
    errs = info.value.errors
    assert any(e.field == field and e.rule == rule and message in e.message for e in errs), errs


def test_defaults_are_filled_in() -> None:
    vm = parse(VmCreate, {"name": "web-1"})
    assert (vm.vcpus, vm.memory_mib, vm.power_state, vm.labels) == (1, 512, "running", {})
    assert vm.restart_policy == "on-failure"


def test_body_must_be_an_object() -> None:
    with pytest.raises(ValidationFailed, match="JSON object"):
        parse(VmCreate, [1, 2])
