"""Bad input gets a 4xx problem+json naming the field; never a 500, never a half-made VM."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.integration.harness import AgentProcess

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


def _problem(r: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = r.json()
    assert body["type"] == f"https://corral.dev/errors/{slug}"
    assert body["status"] == status
    assert body["request_id"] == r.headers["x-request-id"]
    return body


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ({"name": "bad-1", "memory_mib": -512}, "memory_mib", "ge"),
        ({"name": "bad-2", "memory_mib": "lots"}, "memory_mib", "type"),
        ({"name": "bad-3", "vcpus": 1.5}, "vcpus", "type"),
        ({"name": "x" * 300}, "name", "max-length"),
        ({"name": "Not_A_Label"}, "name", "format"),
        ({"name": "bad-4", "gpu": True}, "gpu", "unknown-field"),
        ({"name": "bad-5", "labels": ["a"]}, "labels", "type"),
        ({"memory_mib": 512}, "name", "required"),
        ({"name": "bad-6", "power_state": "maybe"}, "power_state", "one-of"),
    ],
)
def test_create_validation(
    shared_agent: AgentProcess, body: dict[str, Any], field: str, rule: str
) -> None:
    with shared_agent.client() as c:
        p = _problem(c.post("/api/v1/vms", json=body), 422, "validation")
        assert any(e["field"] == field and e["rule"] == rule for e in p["errors"]), p
        assert field in p["detail"]
        names = [v["name"] for v in c.get("/api/v1/vms").json()["items"]]
        assert not [n for n in names if n.startswith("bad-")]


def test_negative_memory_says_the_rule(shared_agent: AgentProcess) -> None:
    with shared_agent.client() as c:
        p = _problem(
            c.post("/api/v1/vms", json={"name": "neg", "memory_mib": -1}), 422, "validation"
        )
        assert p["detail"] == "memory_mib: must be >= 64"


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b'{"name": "a",}', b"", b"\xff\xfe"],
    ids=["syntax", "comma", "empty", "binary"],
)
def test_malformed_json_is_400(shared_agent: AgentProcess, raw: bytes) -> None:
    with shared_agent.client() as c:
        r = c.post("/api/v1/vms", content=raw, headers={"content-type": "application/json"})
        _problem(r, 400, "malformed")


def test_ten_megabyte_body_is_413(shared_agent: AgentProcess) -> None:
    blob = b'{"name": "big", "labels": {"a": "' + b"x" * (10 * 1024 * 1024) + b'"}}'
    with shared_agent.client() as c:
        _problem(
            c.post("/api/v1/vms", content=blob, headers={"content-type": "application/json"}),
            413,
            "too-large",
        )

        def chunks() -> Any:
            for _ in range(10):
                yield b"x" * (1024 * 1024)

        r = c.post("/api/v1/vms", content=chunks(), headers={"content-type": "application/json"})
        _problem(r, 413, "too-large")
        assert c.get("/api/v1/vms/big").status_code == 404


def test_bad_query_and_headers(shared_agent: AgentProcess) -> None:
    with shared_agent.client() as c:
        p = _problem(c.get("/api/v1/vms", params={"limit": 0}), 422, "validation")
        assert p["errors"][0]["field"] == "limit"
        _problem(c.get("/api/v1/vms", params={"limit": "ten"}), 422, "validation")
        p = _problem(c.get("/api/v1/vms", params={"cursor": "garbage"}), 400, "malformed")
        assert "cursor" in p["detail"]
        p = _problem(c.get("/api/v1/vms", params={"label": "=x"}), 422, "validation")
        assert p["errors"][0]["field"] == "label"
        p = _problem(c.get("/api/v1/vms", params={"state": "dancing"}), 422, "validation")
        r = c.post("/api/v1/vms", json={"name": "hdr-1"}, headers={"Idempotency-Key": "no spaces"})
        p = _problem(r, 422, "validation")
        assert p["errors"][0]["field"] == "Idempotency-Key"
        r = c.patch("/api/v1/vms/whatever", json={}, headers={"If-Match": "yesterday"})
        _problem(r, 400, "malformed")


def test_not_found_and_conflicts(shared_agent: AgentProcess) -> None:
    with shared_agent.client() as c:
        p = _problem(c.get("/api/v1/vms/nope"), 404, "not-found")
        assert "nope" in p["detail"]
        _problem(c.post("/api/v1/vms/nope/start"), 404, "not-found")
        _problem(c.get("/api/v1/tasks/0000"), 404, "not-found")
        _problem(c.get("/api/v1/no-such-thing"), 404, "not-found")
        r = c.post("/api/v1/vms/nope/explode")
        assert r.status_code == 422
        r = c.post("/api/v1/vms", params={"wait": "true"}, json={"name": "pat-1", "memory_mib": 64})
        assert r.status_code == 200
        p = _problem(c.patch("/api/v1/vms/pat-1", json={"vcpus": 0}), 422, "validation")
        assert p["errors"][0]["field"] == "vcpus"
        p = _problem(
            c.patch("/api/v1/vms/pat-1", json={"power_state": "stopped"}), 422, "validation"
        )
        assert "start" in p["detail"]
        p = _problem(c.patch("/api/v1/vms/pat-1", json=[1]), 422, "validation")
        p = _problem(c.post("/api/v1/vms/pat-1/stop", json={"force": "yes"}), 422, "validation")
        p = _problem(c.post("/api/v1/vms/pat-1/start", json={"x": 1}), 422, "validation")
        assert c.get("/api/v1/vms/pat-1").json()["spec"]["vcpus"] == 1
        p = _problem(c.get("/api/v1/vms/pat-1/console/log"), 404, "not-found")
        assert "fake driver" in p["detail"]
        _problem(c.get("/api/v1/vms/pat-1/console/log", params={"bytes": 0}), 422, "validation")
