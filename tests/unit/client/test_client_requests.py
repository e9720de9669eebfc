"""What the client sends: paths, bodies, headers, idempotency keys, retries, addresses."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from corral.client import (
    CorralClient,
    NotFound,
    PreconditionFailed,
    Unavailable,
    normalize_addr,
)
from corral.client.testing import FakeCorralApi


def _posts(fake: FakeCorralApi, path: str) -> list[httpx.Request]:
    return [r for r in fake.requests if r.method == "POST" and r.url.path == path]


def test_create_vm_posts_the_spec_and_returns_object_and_pending_task(
    fake: FakeCorralApi, client: CorralClient
) -> None:
    result = client.create_vm({"name": "web-1", "vcpus": 2, "memory_mib": 1024})

    (request,) = _posts(fake, "/api/v1/vms")
    assert json.loads(request.content) == {"name": "web-1", "vcpus": 2, "memory_mib": 1024}
    assert request.headers["content-type"] == "application/json"
    assert result["object"] is not None and result["object"]["name"] == "web-1"
    assert result["task"] is not None
    assert result["task"]["status"]["state"] == "pending"
    assert result["task"]["spec"]["target"] == {"kind": "vm", "name": "web-1"}


def test_every_post_carries_a_fresh_uuid4_idempotency_key(
    fake: FakeCorralApi, client: CorralClient
) -> None:
    client.create_vm({"name": "web-1"})
    client.create_vm({"name": "web-2"})
    keys = [r.headers["idempotency-key"] for r in _posts(fake, "/api/v1/vms")]
    assert len(set(keys)) == 2
    assert all(uuid.UUID(k).version == 4 for k in keys)


def test_create_retried_after_a_lost_response_creates_once(
    fake: FakeCorralApi, client: CorralClient
) -> None:
    # The server applies the create, then the connection drops before the answer arrives.
    fake.inject(httpx.RemoteProtocolError("Server disconnected"), method="POST", after=True)

    result = client.create_vm({"name": "web-1"})

    first, second = _posts(fake, "/api/v1/vms")
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert list(fake.vms) == ["web-1"]
    assert len(fake.tasks) == 1
    assert result["task"] is not None and result["task"]["id"] in fake.tasks


def test_post_is_retried_only_once(fake: FakeCorralApi, client: CorralClient) -> None:
    fake.inject(httpx.ConnectError("[Errno 111] Connection refused"), method="POST", times=2)
    with pytest.raises(Unavailable, match="connection refused"):
        client.vm_action("web-1", "start")
    assert len(fake.requests) == 2


def test_patch_is_not_retried_on_a_dropped_connection(
    fake: FakeCorralApi, client: CorralClient
) -> None:
    fake.add_vm("web-1", node="n1")
    fake.inject(httpx.ReadError("connection reset"), method="PATCH")
    with pytest.raises(Unavailable, match="lost the connection"):
        client.patch_vm("web-1", {"vcpus": 2})
    assert [r.method for r in fake.requests] == ["PATCH"]


def test_patch_sends_a_merge_patch_with_if_match(fake: FakeCorralApi, client: CorralClient) -> None:
    vm = fake.add_vm("web-1", labels={"tier": "web"}, node="n1")
    revision = vm["mod_revision"]

    updated = client.patch_vm("web-1", {"labels": {"tier": None, "env": "prod"}}, if_match=revision)

    request = fake.requests[-1]
    assert request.headers["content-type"] == "application/merge-patch+json"
    assert request.headers["if-match"] == f'"{revision}"'
    assert updated["spec"]["labels"] == {"env": "prod"}
    assert updated["generation"] == 2


def test_stale_if_match_raises_precondition_failed_with_exit_4(
    fake: FakeCorralApi, client: CorralClient
) -> None:
    vm = fake.add_vm("web-1", node="n1")
    stale = vm["mod_revision"] - 1
    with pytest.raises(PreconditionFailed) as caught:
        client.delete_vm("web-1", if_match=stale)
    assert caught.value.exit_code == 4
    assert "web-1" in fake.vms


def test_wait_true_returns_the_ended_task_and_current_object(
    fake: FakeCorralApi, client: CorralClient
) -> None:
    fake.add_vm("web-1", state="stopped", node="n1")

    result = client.vm_action("web-1", "start", wait=True, timeout=30)

    request = fake.requests[-1]
    assert request.url.params["wait"] == "true"
    assert request.url.params["timeout"] == "30"
    assert result["task"] is not None and result["task"]["status"]["state"] == "succeeded"
    assert result["object"] is not None and result["object"]["status"]["state"] == "running"


def test_waited_delete_returns_no_object(fake: FakeCorralApi, client: CorralClient) -> None:
    fake.add_vm("web-1", node="n1")
    result = client.delete_vm("web-1", wait=True)
    assert result["object"] is None
    assert "web-1" not in fake.vms


def test_stop_force_sends_the_body(fake: FakeCorralApi, client: CorralClient) -> None:
    fake.add_vm("web-1", node="n1")
    client.vm_action("web-1", "stop", {"force": True})
    (request,) = _posts(fake, "/api/v1/vms/web-1/stop")
    assert json.loads(request.content) == {"force": True}


def test_names_cannot_escape_their_path_segment(fake: FakeCorralApi, client: CorralClient) -> None:
    fake.add_vm("web-1", node="n1")
    with pytest.raises(NotFound):
        client.get_vm("../vms/web-1")
    assert fake.requests[-1].url.raw_path == b"/api/v1/vms/..%2Fvms%2Fweb-1"


def test_list_filters_are_sent_as_query_parameters(
    fake: FakeCorralApi, client: CorralClient
) -> None:
    fake.add_vm("web-1", labels={"tier": "web"}, node="n1")
    fake.add_vm("web-2", labels={"tier": "web", "env": "prod"}, node="n2")
    fake.add_vm("db-1", labels={"tier": "db"}, node="n1")

    page = client.list_vms(label="tier=web,env!=prod", node="n1", state="running")

    params = fake.requests[-1].url.params
    assert params["label"] == "tier=web,env!=prod"
    assert params["node"] == "n1"
    assert [vm["name"] for vm in page["items"]] == ["web-1"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("127.0.0.1:8700", "http://127.0.0.1:8700"),
        ("127.0.0.1", "http://127.0.0.1:8700"),
        ("corral.example", "http://corral.example:8700"),
        ("http://10.0.0.5:9000/", "http://10.0.0.5:9000"),
        ("https://corral.example", "https://corral.example"),
        ("https://gw.example/corral/", "https://gw.example/corral"),
        ("[::1]:8700", "http://[::1]:8700"),
        ("  http://h:1  ", "http://h:1"),
    ],
)
def test_addresses_with_or_without_scheme(given: str, expected: str) -> None:
    assert normalize_addr(given) == expected
    assert CorralClient(given).base_url == expected


@pytest.mark.parametrize(
    ("given", "complaint"),
    [
        ("", "empty"),
        ("ftp://h:21", "http:// or https://"),
        ("http://", "no host"),
        ("h:port", "invalid port"),
        ("http://h:1/?x=1", "query"),
    ],
)
def test_bad_addresses_are_refused_with_the_reason(given: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        CorralClient(given)


def test_requests_go_below_a_base_path() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={"kind": "cluster", "id": "c1"})

    with CorralClient("https://gw.example/corral", transport=httpx.MockTransport(handler)) as c:
        assert c.cluster()["id"] == "c1"
    assert seen == ["https://gw.example/corral/api/v1/cluster"]
