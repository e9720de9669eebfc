"""`corral vm pause|resume` and `--restart-policy`: what is sent and what the user reads."""

from __future__ import annotations

import json

from corral.client.testing import FakeCorralApi

from .support import Cli, json_out


def _bodies(fake: FakeCorralApi, method: str, path: str) -> list[object]:
    return [
        json.loads(r.content) if r.content else None
        for r in fake.requests
        if r.method == method and r.url.path == path
    ]


def _show(cli: Cli, name: str) -> dict[str, str]:
    result = cli("vm", "show", name)
    assert result.exit_code == 0, result.output
    rows = [line.split("  ", 1) for line in result.stdout.splitlines() if "  " in line]
    return {k.strip(): v.strip() for k, v in rows}


def test_pause_then_resume_waits_and_says_the_state(cli: Cli, fake: FakeCorralApi) -> None:
    paused = cli("vm", "pause", "web-1")
    assert paused.exit_code == 0, paused.output
    assert paused.stdout.startswith("vm web-1 paused on n1 (task ")
    assert _bodies(fake, "POST", "/api/v1/vms/web-1/pause") == [None]
    view = _show(cli, "web-1")
    assert (view["State"], view["Power (desired)"]) == ("paused", "paused")

    resumed = cli("vm", "resume", "web-1")
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout.startswith("vm web-1 running on n1 (task ")
    assert _show(cli, "web-1")["State"] == "running"


def test_pause_json_prints_the_object_and_the_ended_task(cli: Cli) -> None:
    result = cli("vm", "pause", "web-1", "-o", "json")
    assert result.exit_code == 0, result.output
    data = json_out(result)
    assert data["object"]["status"]["state"] == "paused"
    assert data["task"]["spec"]["action"] == "pause"
    assert data["task"]["status"]["state"] == "succeeded"


def test_pause_no_wait_returns_at_once(cli: Cli) -> None:
    result = cli("vm", "pause", "web-1", "--no-wait")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("pause of vm web-1 accepted: task ")


def test_pausing_a_stopped_vm_is_a_conflict_exit_4(cli: Cli) -> None:
    result = cli("vm", "pause", "db-1")
    assert result.exit_code == 4
    assert "error: vm db-1 is stopped" in result.stderr


def test_create_with_a_restart_policy_sends_it(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("vm", "create", "app-1", "--restart-policy", "never")
    assert result.exit_code == 0, result.output
    [body] = _bodies(fake, "POST", "/api/v1/vms")
    assert isinstance(body, dict) and body["restart_policy"] == "never"
    assert _show(cli, "app-1")["Restart policy"] == "never"


def test_edit_restart_policy_is_a_merge_patch(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("vm", "edit", "web-1", "--restart-policy", "always")
    assert result.exit_code == 0, result.output
    assert _bodies(fake, "PATCH", "/api/v1/vms/web-1") == [{"restart_policy": "always"}]
    assert fake.vms["web-1"]["spec"]["restart_policy"] == "always"


def test_an_unknown_restart_policy_is_a_usage_error_listing_the_choices(cli: Cli) -> None:
    result = cli("vm", "create", "app-1", "--restart-policy", "sometimes")
    assert result.exit_code == 2
    assert "--restart-policy" in result.stderr
    assert "always" in result.stderr and "on-failure" in result.stderr
