"""Pages and iterators over lists; waiting for tasks."""

from __future__ import annotations

import httpx
import pytest

from corral.client import (
    ApiError,
    ApiObject,
    CorralClient,
    TaskWaitTimeout,
    Unavailable,
)
from corral.client.testing import FakeCorralApi

from .support import FakeClock


def _seed_vms(fake: FakeCorralApi, count: int) -> list[str]:
    names = [f"vm-{i}" for i in range(count)]
    for name in names:
        fake.add_vm(name, node="n1")
    return names


def test_list_vms_returns_one_page_with_a_cursor(fake: FakeCorralApi, client: CorralClient) -> None:
    names = _seed_vms(fake, 3)

    first = client.list_vms()
    second = client.list_vms(cursor=first["next_cursor"])

    assert [vm["name"] for vm in first["items"]] == names[:2]
    assert first["next_cursor"] is not None
    assert [vm["name"] for vm in second["items"]] == names[2:]
    assert second["next_cursor"] is None
    assert first["revision"] == fake.revision


def test_iter_vms_walks_every_page(fake: FakeCorralApi, client: CorralClient) -> None:
    names = _seed_vms(fake, 5)

    pager = client.iter_vms()
    assert [vm["name"] for vm in pager] == names
    assert pager.pages == 3
    assert pager.revision == fake.revision
    assert [r.url.params.get("cursor") for r in fake.requests] == [None, "o:2", "o:4"]


def test_iter_vms_passes_filters_to_every_page(fake: FakeCorralApi, client: CorralClient) -> None:
    for i in range(3):
        fake.add_vm(f"web-{i}", labels={"tier": "web"}, node="n1")
    fake.add_vm("db-0", labels={"tier": "db"}, node="n1")

    assert [vm["name"] for vm in client.iter_vms(label="tier=web")] == ["web-0", "web-1", "web-2"]
    assert all(r.url.params["label"] == "tier=web" for r in fake.requests)


def test_a_server_that_repeats_its_cursor_is_stopped() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"items": [{"name": "x"}], "next_cursor": "same"})

    with (
        CorralClient("h:1", transport=httpx.MockTransport(handler)) as client,
        pytest.raises(ApiError, match="cursor 'same' twice"),
    ):
        list(client.iter_vms())


def test_list_tasks_by_target(fake: FakeCorralApi, client: CorralClient) -> None:
    fake.add_vm("web-1", state="stopped", node="n1")
    fake.add_vm("web-2", state="stopped", node="n1")
    client.vm_action("web-1", "start")
    client.vm_action("web-2", "start")

    tasks = list(client.iter_tasks(target="vm/web-2"))
    assert [t["spec"]["target"]["name"] for t in tasks] == ["web-2"]


def test_wait_task_polls_until_the_task_succeeds(
    fake: FakeCorralApi, client: CorralClient, clock: FakeClock
) -> None:
    result = client.create_vm({"name": "web-1"})
    assert result["task"] is not None
    seen: list[tuple[str, float, str]] = []

    def on_progress(task: ApiObject) -> None:
        status = task["status"]
        seen.append((status["state"], status["progress"], status["step"]))

    final = client.wait_task(result["task"]["id"], on_progress=on_progress, poll_interval=0.25)

    assert seen == [("running", 0.5, "starting on n1"), ("succeeded", 1.0, "done")]
    assert final["status"]["state"] == "succeeded"
    assert clock.sleeps == [0.25]
    assert fake.vms["web-1"]["status"]["state"] == "running"


def test_wait_task_returns_a_failed_task_with_its_error(
    fake: FakeCorralApi, client: CorralClient
) -> None:
    fake.fail_next_task("no node has 4096 MiB free")
    result = client.create_vm({"name": "big", "memory_mib": 4096})
    assert result["task"] is not None

    final = client.wait_task(result["task"]["id"])

    assert final["status"]["state"] == "failed"
    assert final["status"]["error"] == "no node has 4096 MiB free"


def test_wait_task_gives_up_after_its_timeout(clock: FakeClock) -> None:
    running = {
        "kind": "task",
        "id": "t1",
        "status": {"state": "running", "progress": 0.3, "step": "copying"},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=running)

    transport = httpx.MockTransport(handler)
    with (
        CorralClient("h:1", transport=transport, sleep=clock.sleep, clock=clock) as client,
        pytest.raises(TaskWaitTimeout) as caught,
    ):
        client.wait_task("t1", timeout=3, poll_interval=1)
    assert str(caught.value) == "task t1 did not finish within 3s (state running, step 'copying')"
    assert caught.value.task == running
    assert sum(clock.sleeps) == 3


def test_wait_task_rides_out_a_leader_election(fake: FakeCorralApi, client: CorralClient) -> None:
    result = client.create_vm({"name": "web-1"})
    assert result["task"] is not None
    fake.inject(httpx.Response(503, text="no leader"), path="/api/v1/tasks/", times=2)

    final = client.wait_task(result["task"]["id"])

    assert final["status"]["state"] == "succeeded"


def test_wait_task_stops_when_the_server_stays_unavailable(
    fake: FakeCorralApi, client: CorralClient
) -> None:
    result = client.create_vm({"name": "web-1"})
    assert result["task"] is not None
    fake.inject(httpx.Response(503, text="no leader"), path="/api/v1/tasks/", times=100)

    with pytest.raises(Unavailable, match="HTTP 503"):
        client.wait_task(result["task"]["id"])
