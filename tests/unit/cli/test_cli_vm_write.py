"""`corral vm create|start|stop|reboot|delete|edit`: what is sent, waiting, and the outcome."""

from __future__ import annotations

import json

import pytest

from corral.client.testing import FakeCorralApi

from .support import Cli, json_out, squash


def _bodies(fake: FakeCorralApi, method: str, path: str) -> list[object]:
    return [
        json.loads(r.content) if r.content else None
        for r in fake.requests
        if r.method == method and r.url.path == path
    ]


def _task_id(fake: FakeCorralApi) -> str:
    (task_id,) = fake.tasks
    return task_id


@pytest.mark.parametrize(
    ("memory", "mib"),
    [("1G", 1024), ("512", 512), ("512M", 512), ("1.5G", 1536), ("2048MiB", 2048), ("2gib", 2048)],
)
def test_create_sends_memory_in_mib(cli: Cli, fake: FakeCorralApi, memory: str, mib: int) -> None:
    result = cli("vm", "create", "web-3", "--memory", memory)
    assert result.exit_code == 0, result.output
    assert _bodies(fake, "POST", "/api/v1/vms") == [
        {"name": "web-3", "power_state": "running", "memory_mib": mib}
    ]


@pytest.mark.parametrize(
    ("memory", "rule"),
    [
        ("lots", "'lots' is not a size; give MiB (512) or a size with a unit"),
        ("1X", "'1X' has unknown unit 'X'; use K, M, G or T"),
        ("1.3M", "'1.3M' is 1.3 MiB; must be whole MiB"),
        ("0", "'0' must be greater than 0"),
        ("-5G", "'-5G' is not a size"),
    ],
)
def test_bad_memory_is_a_usage_error_naming_the_option_and_rule(
    cli: Cli, fake: FakeCorralApi, memory: str, rule: str
) -> None:
    result = cli("vm", "create", "web-3", "--memory", memory)
    assert result.exit_code == 2
    message = squash(result.stderr)
    assert "Invalid value for '--memory'" in message
    assert rule in message
    assert fake.requests == []


def test_create_waits_and_prints_where_the_vm_runs(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("vm", "create", "web-3", "--vcpus", "2", "-l", "tier=web", "-l", "env=dev")

    assert result.exit_code == 0, result.output
    task_id = _task_id(fake)
    assert result.stdout == f"vm web-3 running on n1 (task {task_id[:8]})\n"
    assert f"{task_id[:8]} (create vm/web-3): running 50% starting on n1" in result.stderr
    assert fake.vms["web-3"]["spec"]["labels"] == {"tier": "web", "env": "dev"}
    assert fake.vms["web-3"]["spec"]["vcpus"] == 2


def test_create_on_a_terminal_shows_a_progress_bar(fake: FakeCorralApi) -> None:
    result = Cli(fake, force_terminal=True)("vm", "create", "web-3")

    assert result.exit_code == 0, result.output
    assert result.stdout == f"vm web-3 running on n1 (task {_task_id(fake)[:8]})\n"
    assert "━" in result.stderr  # the bar
    assert "starting on n1" in result.stderr  # the task's step text
    assert "running 50%" not in result.stderr  # not the plain progress lines


def test_create_no_start_leaves_the_vm_stopped(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("vm", "create", "web-3", "--no-start")
    assert result.exit_code == 0, result.output
    assert _bodies(fake, "POST", "/api/v1/vms") == [{"name": "web-3", "power_state": "stopped"}]
    assert result.stdout.startswith("vm web-3 stopped")


def test_create_no_wait_returns_at_once(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("vm", "create", "web-3", "--no-wait")

    assert result.exit_code == 0, result.output
    task_id = _task_id(fake)
    assert result.stdout == f"create of vm web-3 accepted: task {task_id[:8]} is pending\n"
    assert f"corral task watch {task_id}" in result.stderr
    assert fake.tasks[task_id]["status"]["state"] == "pending"  # never polled


def test_create_json_waits_then_prints_object_and_ended_task(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("vm", "create", "web-3", "-o", "json")

    assert result.exit_code == 0, result.output
    printed = json_out(result)
    assert printed == {"object": fake.vms["web-3"], "task": fake.tasks[_task_id(fake)]}
    assert printed["task"]["status"]["state"] == "succeeded"
    assert printed["object"]["status"]["state"] == "running"
    assert result.stderr == ""


def test_create_json_no_wait_prints_the_accepted_result(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("-o", "json", "vm", "create", "web-3", "--no-wait")
    assert result.exit_code == 0, result.output
    assert json_out(result)["task"]["status"]["state"] == "pending"
    assert json_out(result)["object"]["name"] == "web-3"


def test_a_failed_task_prints_its_error_and_exits_1(cli: Cli, fake: FakeCorralApi) -> None:
    fake.fail_next_task("no node has 8192 MiB free")

    result = cli("vm", "create", "huge", "--memory", "8G")

    assert result.exit_code == 1
    assert result.stdout == ""
    task = fake.tasks[_task_id(fake)]
    assert f"error: task {task['id'][:8]} (create vm/huge) failed: no node has 8192 MiB free" in (
        result.stderr
    )
    assert f"request id: {task['request_id']}" in result.stderr


def test_a_failed_task_with_json_still_prints_the_json(cli: Cli, fake: FakeCorralApi) -> None:
    fake.fail_next_task("qemu exited with status 1")
    result = cli("vm", "create", "web-3", "-o", "json")
    assert result.exit_code == 1
    assert json_out(result)["task"]["status"]["error"] == "qemu exited with status 1"
    assert "qemu exited with status 1" in result.stderr


def test_waiting_past_the_timeout_exits_1_and_says_how_to_follow(
    cli: Cli, fake: FakeCorralApi
) -> None:
    result = cli("vm", "create", "web-3", "--timeout", "0")
    assert result.exit_code == 1
    task_id = _task_id(fake)
    assert f"error: task {task_id} did not finish within 0s (state running" in result.stderr
    assert f"corral task watch {task_id}" in result.stderr


def test_create_validation_errors_list_each_field(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("vm", "create", "web-3", "--memory", "32")

    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "error: memory_mib: must be >= 64"
    assert lines[1] == "  memory_mib: must be >= 64 [ge]"
    assert lines[2].startswith("request id: req-")
    assert "web-3" not in fake.vms


def test_creating_a_taken_name_exits_4(cli: Cli) -> None:
    result = cli("vm", "create", "web-1")
    assert result.exit_code == 4
    assert result.stderr.startswith("error: vm web-1 already exists\n")


def test_a_bad_label_is_a_usage_error(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("vm", "create", "web-3", "--label", "tier")
    assert result.exit_code == 2
    assert "Invalid value for '--label': expected KEY=VALUE, got 'tier'" in squash(result.stderr)
    assert fake.requests == []


def test_stop_force_sends_force_and_reports_the_stopped_vm(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("vm", "stop", "web-1", "--force")

    assert result.exit_code == 0, result.output
    assert _bodies(fake, "POST", "/api/v1/vms/web-1/stop") == [{"force": True}]
    assert result.stdout == f"vm web-1 stopped on n1 (task {_task_id(fake)[:8]})\n"


def test_start_and_reboot(cli: Cli, fake: FakeCorralApi) -> None:
    started = cli("vm", "start", "db-1")
    assert started.exit_code == 0, started.output
    assert started.stdout.startswith("vm db-1 running on n1 (task ")

    rebooted = cli("vm", "reboot", "web-2", "--no-wait")
    assert rebooted.exit_code == 0, rebooted.output
    assert rebooted.stdout.startswith("reboot of vm web-2 accepted: task ")
    assert _bodies(fake, "POST", "/api/v1/vms/web-2/reboot") == [None]


def test_starting_a_running_vm_is_a_conflict_exit_4(cli: Cli) -> None:
    result = cli("vm", "start", "web-1")
    assert result.exit_code == 4
    assert "error: vm web-1 is already running" in result.stderr


def test_delete_yes_deletes_without_asking(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("vm", "delete", "web-1", "--yes")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"vm web-1 deleted (task {_task_id(fake)[:8]})\n"
    assert "web-1" not in fake.vms


def test_delete_asks_first_and_a_no_keeps_the_vm(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("vm", "delete", "web-1", input="n\n")
    assert result.exit_code == 1
    assert "delete vm web-1 (running on n1)?" in result.stderr
    assert "web-1" in fake.vms
    assert [r.method for r in fake.requests] == ["GET"]

    confirmed = cli("vm", "delete", "web-1", input="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert "web-1" not in fake.vms


def test_delete_json_after_waiting_has_no_object(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("vm", "delete", "web-1", "-y", "-o", "json")
    assert result.exit_code == 0, result.output
    printed = json_out(result)
    assert printed["object"] is None
    assert printed["task"]["status"]["state"] == "succeeded"


def test_deleting_a_missing_vm_exits_3_without_asking(cli: Cli) -> None:
    result = cli("vm", "delete", "web-9")
    assert result.exit_code == 3
    assert "?" not in result.output
    assert result.stderr.startswith("error: vm web-9 not found")


def test_edit_sends_one_merge_patch(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli(
        "vm",
        "edit",
        "web-2",
        "--vcpus",
        "4",
        "--memory",
        "2G",
        "--label",
        "owner=ops",
        "--remove-label",
        "env",
    )

    assert result.exit_code == 0, result.output
    assert _bodies(fake, "PATCH", "/api/v1/vms/web-2") == [
        {"vcpus": 4, "memory_mib": 2048, "labels": {"owner": "ops", "env": None}}
    ]
    vm = fake.vms["web-2"]
    assert vm["spec"]["labels"] == {"tier": "web", "owner": "ops"}
    assert result.stdout == f"vm web-2 updated (generation 2, revision {vm['mod_revision']})\n"


def test_edit_with_a_stale_if_match_exits_4(cli: Cli, fake: FakeCorralApi) -> None:
    stale = fake.vms["web-1"]["mod_revision"] - 1
    result = cli("vm", "edit", "web-1", "--vcpus", "8", "--if-match", str(stale))
    assert result.exit_code == 4
    assert f"not {stale}" in result.stderr
    assert fake.vms["web-1"]["spec"]["vcpus"] == 2


def test_edit_without_changes_is_a_usage_error(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("vm", "edit", "web-1")
    assert result.exit_code == 2
    assert "nothing to change" in squash(result.stderr)
    assert fake.requests == []
