"""The REST API against a real agent process with a real etcd member."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from tests.integration.harness import AgentProcess

pytestmark = pytest.mark.integration


def _create(c: httpx.Client, name: str, **spec: Any) -> dict[str, Any]:
    r = c.post("/api/v1/vms", params={"wait": "true", "timeout": "30"}, json={"name": name, **spec})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_openapi_is_valid_openapi_3(shared_agent: AgentProcess) -> None:
    spec = httpx.get(shared_agent.url + "/api/v1/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    validate(spec)
    for path in (
        "/api/v1/vms",
        "/api/v1/vms/{name}",
        "/api/v1/nodes",
        "/api/v1/tasks/{task_id}",
        "/api/v1/cluster",
        "/healthz",
        "/readyz",
    ):
        assert path in spec["paths"], path


def test_cluster_and_node_report_themselves(shared_agent: AgentProcess) -> None:
    with shared_agent.client() as c:
        cluster = c.get("/api/v1/cluster").json()
        assert cluster["leader"]["node"] == "n1"
        assert [(m["name"], m["is_learner"], m["healthy"]) for m in cluster["members"]] == [
            ("n1", False, True)
        ]
        assert cluster["revision"] > 0
        uuid.UUID(cluster["id"])
        nodes = c.get("/api/v1/nodes").json()["items"]
        assert [n["name"] for n in nodes] == ["n1"]
        node = c.get("/api/v1/nodes/n1").json()
        assert node["status"]["state"] == "ready"
        inv = node["status"]["inventory"]
        assert inv["cpus"] >= 1 and inv["memory_mib"] > 256 and inv["disk_gib"] > 0
        assert inv["driver"] == "fake" and inv["kernel"]


def test_vm_lifecycle_create_stop_start_reboot_delete(shared_agent: AgentProcess) -> None:
    with shared_agent.client() as c:
        body = _create(c, "life-1", vcpus=2, memory_mib=256, labels={"tier": "web"})
        vm, task = body["object"], body["task"]
        assert task["status"]["state"] == "succeeded", task
        assert task["status"]["progress"] == 1.0
        assert vm["status"]["state"] == "running" and vm["status"]["node"] == "n1"
        assert vm["spec"] == {
            "vcpus": 2,
            "memory_mib": 256,
            "labels": {"tier": "web"},
            "power_state": "running",
            "restart_policy": "on-failure",
            "image": None,
            "disks": [],
            "nics": [],
            # Placement: defaults (see `corral vm why`).
            "group": None,
            "node_selector": {},
            "required_labels": [],
            "affinity_vm": None,
            "spread_over": None,
            "priority": 0,
            "placement_policy": None,
        }
        uuid.UUID(vm["id"])

        r = c.post("/api/v1/vms/life-1/stop", params={"wait": "true"})
        assert r.status_code == 200, r.text
        assert r.json()["object"]["status"]["state"] == "stopped"

        r = c.post("/api/v1/vms/life-1/start", params={"wait": "true"})
        assert r.json()["object"]["status"]["state"] == "running"
        started = r.json()["object"]["status"]["started_at"]

        r = c.post("/api/v1/vms/life-1/reboot", params={"wait": "true"})
        assert r.json()["task"]["status"]["state"] == "succeeded"
        assert r.json()["object"]["status"]["started_at"] != started

        node = c.get("/api/v1/nodes/n1").json()
        assert node["status"]["allocated"]["vcpus"] >= 2

        r = c.delete("/api/v1/vms/life-1", params={"wait": "true"})
        assert r.status_code == 200, r.text
        assert r.json()["task"]["status"]["state"] == "succeeded"
        assert r.json()["object"] is None
        assert c.get("/api/v1/vms/life-1").status_code == 404


def test_create_without_wait_returns_202_and_a_task_that_ends(shared_agent: AgentProcess) -> None:
    with shared_agent.client() as c:
        r = c.post("/api/v1/vms", json={"name": "nowait-1", "memory_mib": 64})
        assert r.status_code == 202
        task = r.json()["task"]
        assert task["status"]["state"] in ("pending", "running")
        assert r.headers["location"] == f"/api/v1/tasks/{task['id']}"
        done = c.get(f"/api/v1/tasks/{task['id']}", params={"wait": "true"}).json()
        assert done["status"]["state"] == "succeeded"
        assert [s["state"] for s in done["status"]["steps"]] == ["done"] * 4
        assert done["request_id"] == r.headers["x-request-id"]


def test_list_paginates_and_filters_by_label(shared_agent: AgentProcess) -> None:
    with shared_agent.client() as c:
        for i in range(5):
            r = c.post(
                "/api/v1/vms",
                json={
                    "name": f"page-{i}",
                    "memory_mib": 64,
                    "labels": {"set": "pages", "odd": str(i % 2)},
                },
            )
            assert r.status_code == 202
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 2, "label": "set=pages"}
            if cursor:
                params["cursor"] = cursor
            page = c.get("/api/v1/vms", params=params).json()
            seen += [v["name"] for v in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [f"page-{i}" for i in range(5)]
        assert pages == 3
        odd = c.get("/api/v1/vms", params={"label": "set=pages,odd!=0"}).json()["items"]
        assert [v["name"] for v in odd] == ["page-1", "page-3"]


def test_idempotency_key_never_creates_twice(shared_agent: AgentProcess) -> None:
    key = str(uuid.uuid4())
    with shared_agent.client() as c:
        body = {"name": "idem-1", "memory_mib": 64}
        first = c.post("/api/v1/vms", json=body, headers={"Idempotency-Key": key})
        again = c.post("/api/v1/vms", json=body, headers={"Idempotency-Key": key})
        assert first.status_code == 202 and again.status_code == 200
        assert again.json()["object"]["id"] == first.json()["object"]["id"]
        assert again.json()["task"]["id"] == first.json()["task"]["id"]
        other = c.post("/api/v1/vms", json={**body, "vcpus": 2}, headers={"Idempotency-Key": key})
        assert other.status_code == 409
        assert "different request" in other.json()["detail"]
        plain = c.post("/api/v1/vms", json=body)
        assert plain.status_code == 409
        assert plain.json()["type"].endswith("/conflict")


def test_etag_and_if_match(shared_agent: AgentProcess) -> None:
    with shared_agent.client() as c:
        _create(c, "etag-1", memory_mib=64)
        r = c.get("/api/v1/vms/etag-1")
        etag = r.headers["etag"]
        assert etag == f'"{r.json()["mod_revision"]}"'
        ok = c.patch("/api/v1/vms/etag-1", json={"labels": {"a": "1"}}, headers={"If-Match": etag})
        assert ok.status_code == 200, ok.text
        assert ok.json()["spec"]["labels"] == {"a": "1"}
        stale = c.patch(
            "/api/v1/vms/etag-1", json={"labels": {"a": "2"}}, headers={"If-Match": etag}
        )
        assert stale.status_code == 412
        assert stale.headers["content-type"].startswith("application/problem+json")
        assert c.get("/api/v1/vms/etag-1").json()["spec"]["labels"] == {"a": "1"}
        gone = c.post("/api/v1/vms/etag-1/stop", headers={"If-Match": etag})
        assert gone.status_code == 412
        removed = c.patch("/api/v1/vms/etag-1", json={"labels": {"a": None}})
        assert removed.json()["spec"]["labels"] == {}


def test_unplaceable_vm_stays_pending_with_the_reason(shared_agent: AgentProcess) -> None:
    with shared_agent.client() as c:
        r = c.post("/api/v1/vms", json={"name": "huge-1", "memory_mib": 4 * 1024 * 1024})
        assert r.status_code == 202
        task_id = r.json()["task"]["id"]
        task = c.get(f"/api/v1/tasks/{task_id}", params={"wait": "true", "timeout": "2"}).json()
        assert task["status"]["state"] == "running"
        vm = c.get("/api/v1/vms/huge-1").json()
        assert vm["status"]["state"] == "pending"
        assert "insufficient memory" in vm["status"]["message"]
        assert "insufficient memory" in task["status"]["step"]
        assert c.delete("/api/v1/vms/huge-1", params={"wait": "true"}).status_code == 200
        assert c.get(f"/api/v1/tasks/{task_id}").json()["status"]["state"] in (
            "failed",
            "cancelled",
        )


def test_pause_and_resume_through_the_api(shared_agent: AgentProcess) -> None:
    with shared_agent.client() as c:
        booted = _create(c, "pause-1", memory_mib=64)["object"]["status"]["started_at"]

        r = c.post("/api/v1/vms/pause-1/pause", params={"wait": "true"})
        assert r.status_code == 200, r.text
        vm, task = r.json()["object"], r.json()["task"]
        assert task["status"]["state"] == "succeeded" and task["spec"]["action"] == "pause"
        assert (vm["spec"]["power_state"], vm["status"]["state"]) == ("paused", "paused")
        assert c.get("/api/v1/vms", params={"state": "paused"}).json()["items"][0]["name"] == (
            "pause-1"
        )
        # A paused VM cannot be rebooted: the error says what to do instead.
        r = c.post("/api/v1/vms/pause-1/reboot")
        assert r.status_code == 409, r.text
        assert "corral vm resume pause-1" in r.json()["detail"]

        r = c.post("/api/v1/vms/pause-1/resume", params={"wait": "true"})
        assert r.json()["object"]["status"]["state"] == "running"
        assert r.json()["object"]["status"]["started_at"] == booted  # resumed, not rebooted
        # Resuming a running VM changes nothing and succeeds.
        r = c.post("/api/v1/vms/pause-1/resume", params={"wait": "true"})
        assert r.json()["task"]["status"]["state"] == "succeeded"

        # `start` on a paused VM resumes it too.
        c.post("/api/v1/vms/pause-1/pause", params={"wait": "true"})
        r = c.post("/api/v1/vms/pause-1/start", params={"wait": "true"})
        assert r.json()["object"]["status"]["state"] == "running"
        assert r.json()["object"]["status"]["started_at"] == booted

        r = c.post("/api/v1/vms/pause-1/stop", params={"wait": "true"})
        assert r.json()["object"]["status"]["state"] == "stopped"
        for action in ("pause", "resume", "reboot"):
            r = c.post(f"/api/v1/vms/pause-1/{action}")
            assert r.status_code == 409, r.text
            assert r.json()["type"].endswith("/conflict")
            assert r.json()["detail"] == (
                "vm 'pause-1' is stopped (its desired power state); start it first with "
                "`corral vm start pause-1` (POST /api/v1/vms/pause-1/start)"
            )
        c.delete("/api/v1/vms/pause-1", params={"wait": "true"})


def test_restart_policy_is_set_at_create_and_patched(shared_agent: AgentProcess) -> None:
    with shared_agent.client() as c:
        vm = _create(c, "policy-1", memory_mib=64, restart_policy="never")["object"]
        assert vm["spec"]["restart_policy"] == "never"
        r = c.patch("/api/v1/vms/policy-1", json={"restart_policy": "always"})
        assert r.status_code == 200, r.text
        assert r.json()["spec"]["restart_policy"] == "always"
        r = c.patch("/api/v1/vms/policy-1", json={"restart_policy": "sometimes"})
        assert r.status_code == 422
        assert r.json()["errors"][0]["field"] == "restart_policy"
        # The node applies the change without restarting the running VM.
        deadline = time.monotonic() + 10
        while (running := c.get("/api/v1/vms/policy-1").json())["status"][
            "observed_generation"
        ] < running["generation"]:
            assert time.monotonic() < deadline, running
            time.sleep(0.1)
        assert running["status"]["state"] == "running"
        assert running["status"]["started_at"] == vm["status"]["started_at"]
        c.delete("/api/v1/vms/policy-1", params={"wait": "true"})
