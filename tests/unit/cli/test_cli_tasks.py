"""`corral task ls|show|watch`."""

from __future__ import annotations

import itertools

from corral.client.testing import FakeCorralApi

from .support import CREATED, Cli, json_out, kv, row_for, rows


def _start_tasks(cli: Cli, *names: str) -> None:
    for name in names:
        assert cli("vm", "stop", name, "--no-wait").exit_code == 0


def test_task_ls_shows_short_ids_progress_and_steps(cli: Cli, fake: FakeCorralApi) -> None:
    _start_tasks(cli, "web-1", "web-2")
    first, second = fake.tasks
    fake.advance(first)  # running, 50%

    result = cli("task", "ls")

    assert result.exit_code == 0, result.output
    assert rows(result.stdout)[0] == [
        "ID",
        "ACTION",
        "TARGET",
        "STATE",
        "PROGRESS",
        "STEP",
        "AGE",
    ]
    assert row_for(result.stdout, first[:8]) == [
        first[:8],
        "stop",
        "vm/web-1",
        "running",
        "50%",
        "stopping on n1",
        "2m",
    ]
    assert row_for(result.stdout, second[:8]) == [
        second[:8],
        "stop",
        "vm/web-2",
        "pending",
        "0%",
        "queued",
        "2m",
    ]


def test_task_ls_filters_by_target_and_state(cli: Cli, fake: FakeCorralApi) -> None:
    _start_tasks(cli, "web-1", "web-2")
    by_target = cli("task", "ls", "--target", "vm/web-2")
    assert [row[2] for row in rows(by_target.stdout)[1:]] == ["vm/web-2"]

    fake.advance(next(iter(fake.tasks)))
    running = cli("task", "ls", "--state", "running", "-o", "json")
    assert [t["spec"]["target"]["name"] for t in json_out(running)["items"]] == ["web-1"]


def test_task_show_accepts_a_short_id(cli: Cli, fake: FakeCorralApi) -> None:
    _start_tasks(cli, "web-1")
    (task_id,) = fake.tasks

    result = cli("task", "show", task_id[:8])

    assert result.exit_code == 0, result.output
    view = kv(result.stdout)
    assert view["ID"] == task_id
    assert view["Target"] == "vm/web-1"
    assert view["State"] == "pending"
    assert view["Actor"] == "token:test"
    assert row_for(result.stdout, "signalling")[:2] == ["signalling", "pending"]


def test_task_show_json_is_the_task(cli: Cli, fake: FakeCorralApi) -> None:
    _start_tasks(cli, "web-1")
    (task_id,) = fake.tasks
    result = cli("task", "show", task_id, "-o", "json")
    assert json_out(result) == fake.tasks[task_id]


def test_an_ambiguous_prefix_is_a_usage_error() -> None:
    counter = itertools.count()
    fake = FakeCorralApi(now=lambda: CREATED, new_id=lambda: f"abcd{next(counter):04d}-task")
    fake.add_node("n1")
    fake.add_vm("web-1", node="n1")
    fake.add_vm("web-2", node="n1")
    cli = Cli(fake)
    _start_tasks(cli, "web-1", "web-2")

    result = cli("task", "show", "abcd")

    assert result.exit_code == 2
    assert "'abcd' matches 2 tasks" in result.stderr


def test_task_show_of_an_unknown_id_exits_3(cli: Cli) -> None:
    result = cli("task", "show", "ffffffff")
    assert result.exit_code == 3
    assert result.stderr.startswith("error: task ffffffff not found")


def test_task_watch_follows_the_task_to_success(cli: Cli, fake: FakeCorralApi) -> None:
    _start_tasks(cli, "web-1")
    (task_id,) = fake.tasks

    result = cli("task", "watch", task_id[:8])

    assert result.exit_code == 0, result.output
    assert result.stdout == f"task {task_id[:8]} (stop vm/web-1) succeeded\n"
    assert "running 50% stopping on n1" in result.stderr
    assert fake.vms["web-1"]["status"]["state"] == "stopped"


def test_task_watch_of_a_failed_task_exits_1(cli: Cli, fake: FakeCorralApi) -> None:
    fake.fail_next_task("guest did not shut down")
    _start_tasks(cli, "web-1")
    (task_id,) = fake.tasks

    result = cli("task", "watch", task_id, "-o", "json")

    assert result.exit_code == 1
    assert json_out(result)["status"]["state"] == "failed"
    assert (
        f"error: task {task_id[:8]} (stop vm/web-1) failed: guest did not shut down"
        in result.stderr
    )
