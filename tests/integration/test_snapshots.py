"""Refusals of snapshots, clones and templates through a real agent (fake driver): what a user
sent wrong, or asked of a VM in the wrong state, gets a problem document that says what to do.
The working paths run real guests: tests/e2e/test_snapshots_qemu.py."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.integration.harness import AgentProcess, wait_for

pytestmark = pytest.mark.integration


def _problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    return body


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Any:
    a = AgentProcess(tmp_path_factory.mktemp("snapshots") / "n1").start()
    yield a
    a.stop()


def test_refusals_name_the_field_or_the_state_and_the_way_out(agent: AgentProcess) -> None:
    with agent.client(timeout=60) as c:
        r = c.post("/api/v1/volumes", json={"name": "w1-data", "size_gib": 1, "node": "n1"})
        assert r.status_code == 201, r.text
        r = c.post(
            "/api/v1/vms",
            params={"wait": "true", "timeout": "30"},
            json={"name": "w1", "memory_mib": 128, "disks": [{"volume": "w1-data"}], "nics": [{}]},
        )
        assert r.status_code == 200, r.text
        mac = r.json()["object"]["spec"]["nics"][0]["mac"]
        assert mac.startswith("52:54:00:")

        bad = _problem(c.post("/api/v1/vms/w1/snapshots", json={"name": "Bad_Name"}), 422)
        assert bad["errors"][0]["field"] == "name"
        assert _problem(c.get("/api/v1/vms/nope/snapshots"), 404)
        gone = _problem(c.post("/api/v1/vms/w1/snapshots/none/rollback"), 404)
        assert "corral vm snapshot ls w1" in gone["detail"]

        # The fake driver keeps no disks: the task fails with the host's reason, no record stays.
        r = c.post(
            "/api/v1/vms/w1/snapshots",
            params={"wait": "true", "timeout": "30"},
            json={"name": "s1"},
        )
        task = r.json()["task"]
        assert task["status"]["state"] == "failed" and "need qemu" in task["status"]["error"]
        assert c.get("/api/v1/vms/w1/snapshots").json()["items"] == []

        nowhere = _problem(c.post("/api/v1/vms/w1/clone", json={"name": "w2", "to": "n9"}), 422)
        assert nowhere["errors"][0]["field"] == "to"
        assert "corral node ls" in nowhere["errors"][0]["message"]
        linked = _problem(c.post("/api/v1/vms/w1/clone", json={"name": "w2", "linked": True}), 409)
        assert "need qemu" in linked["detail"]
        assert c.get("/api/v1/volumes/w2-disk0").status_code == 404, "nothing half-made"
        assert c.get("/api/v1/vms/w1").json()["spec"]["disks"] == [{"volume": "w1-data"}]
        running = _problem(c.post("/api/v1/templates", json={"name": "t1", "vm": "w1"}), 409)
        assert "corral vm stop w1" in running["detail"]
        assert _problem(c.delete("/api/v1/templates/none"), 404)
        assert _problem(c.post("/api/v1/templates/none/instantiate", json={"name": "x"}), 404)

        # A stopped VM becomes a template; its volume is held and cannot be deleted.
        r = c.post("/api/v1/vms/w1/stop", params={"wait": "true", "timeout": "30"})
        assert r.json()["object"]["status"]["state"] == "stopped"
        r = c.post("/api/v1/templates", json={"name": "t1", "vm": "w1"})
        assert r.status_code == 201, r.text
        assert r.json()["spec"]["vm"]["disks"] == [{"volume": "w1-data"}]
        assert r.json()["spec"]["vm"]["nics"] == [{"mac": None}]
        wait_for(lambda: c.get("/api/v1/vms/w1").status_code == 404, 30, "w1 to go")
        held = _problem(c.delete("/api/v1/volumes/w1-data"), 409)
        assert "template:t1" in held["detail"]
        assert c.get("/api/v1/volumes/w1-data").json()["status"]["attached_to"] == "template:t1"
        assert [t["name"] for t in c.get("/api/v1/templates").json()["items"]] == ["t1"]

        r = c.delete("/api/v1/templates/t1")
        assert r.status_code == 200, r.text
        wait_for(lambda: c.get("/api/v1/volumes/w1-data").status_code == 404, 30, "its volume")
