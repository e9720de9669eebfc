"""Error answers and transport failures become the right exception, message and exit code."""

from __future__ import annotations

import json
import re
import socket

import httpx
import pytest

from corral.client import (
    ApiError,
    BadRequest,
    Conflict,
    CorralClient,
    FieldError,
    Forbidden,
    NotFound,
    PreconditionFailed,
    QuotaExceeded,
    ServerError,
    TooLarge,
    Unauthorized,
    Unavailable,
    Unschedulable,
    ValidationFailed,
)
from corral.client.testing import FakeCorralApi


def _problem(status: int, slug: str, detail: str, **extra: object) -> httpx.Response:
    body = {
        "type": f"https://corral.dev/errors/{slug}",
        "title": "Problem",
        "status": status,
        "detail": detail,
        "request_id": "req-problem",
        **extra,
    }
    return httpx.Response(
        status, content=json.dumps(body), headers={"Content-Type": "application/problem+json"}
    )


@pytest.mark.parametrize(
    ("status", "slug", "error", "exit_code"),
    [
        (400, "malformed", BadRequest, 1),
        (401, "unauthorized", Unauthorized, 1),
        (403, "forbidden", Forbidden, 1),
        (404, "not-found", NotFound, 3),
        (409, "conflict", Conflict, 4),
        (409, "quota-exceeded", QuotaExceeded, 4),
        (409, "unschedulable", Unschedulable, 4),
        (412, "precondition-failed", PreconditionFailed, 4),
        (413, "too-large", TooLarge, 1),
        (422, "validation", ValidationFailed, 1),
        (500, "internal", ServerError, 1),
        (503, "unavailable", Unavailable, 5),
    ],
)
def test_problem_types_map_to_exceptions_and_exit_codes(
    fake: FakeCorralApi,
    client: CorralClient,
    status: int,
    slug: str,
    error: type[ApiError],
    exit_code: int,
) -> None:
    fake.inject(_problem(status, slug, f"it went wrong: {slug}"))
    with pytest.raises(error) as caught:
        client.cluster()
    exc = caught.value
    assert type(exc) is error
    assert (exc.status, exc.slug, exc.exit_code) == (status, slug, exit_code)
    assert exc.message == f"it went wrong: {slug}"
    assert exc.request_id == "req-problem"


def test_validation_errors_name_each_field(fake: FakeCorralApi, client: CorralClient) -> None:
    with pytest.raises(ValidationFailed) as caught:
        client.create_vm({"name": "web-1", "vcpus": 0, "memory_mib": 32})
    exc = caught.value
    assert exc.message == "vcpus: must be >= 1"
    assert exc.errors == (
        FieldError("vcpus", "ge", "must be >= 1"),
        FieldError("memory_mib", "ge", "must be >= 64"),
    )
    assert exc.request_id is not None and exc.request_id.startswith("req-")
    assert not fake.vms


def test_unknown_problem_type_falls_back_on_the_status(
    fake: FakeCorralApi, client: CorralClient
) -> None:
    fake.inject(_problem(409, "already-migrating", "web-1 is migrating"))
    with pytest.raises(Conflict, match="web-1 is migrating") as caught:
        client.cluster()
    assert caught.value.exit_code == 4


def test_plain_text_500_still_explains_itself(fake: FakeCorralApi, client: CorralClient) -> None:
    fake.inject(
        httpx.Response(500, text="Internal Server Error\n", headers={"X-Request-Id": "req-9"})
    )
    with pytest.raises(ServerError) as caught:
        client.list_vms()
    exc = caught.value
    assert exc.message.startswith("HTTP 500 Internal Server Error")
    assert "bug in corral" in exc.message
    assert (exc.exit_code, exc.request_id) == (1, "req-9")


def test_proxy_503_with_retry_after_is_unavailable(
    fake: FakeCorralApi, client: CorralClient
) -> None:
    fake.inject(
        httpx.Response(503, text="<html>upstream down</html>", headers={"Retry-After": "7"})
    )
    with pytest.raises(Unavailable) as caught:
        client.get_node("n1")
    exc = caught.value
    assert (exc.exit_code, exc.retry_after) == (5, 7.0)
    assert "upstream down" in exc.message
    assert "retry after 7s" in exc.message


def test_fastapi_default_errors_are_understood(fake: FakeCorralApi, client: CorralClient) -> None:
    fake.inject(httpx.Response(404, json={"detail": "Not Found"}))
    with pytest.raises(NotFound, match=r"^Not Found$"):
        client.get_vm("web-1")

    fake.inject(
        httpx.Response(
            422,
            json={
                "detail": [
                    {"loc": ["body", "memory_mib"], "msg": "too small", "type": "greater_than"}
                ]
            },
        )
    )
    with pytest.raises(ValidationFailed) as caught:
        client.create_vm({"name": "web-1"})
    assert caught.value.errors == (FieldError("memory_mib", "greater_than", "too small"),)
    assert caught.value.message == "memory_mib: too small"


def test_a_non_json_success_says_the_address_may_be_wrong(
    fake: FakeCorralApi, client: CorralClient
) -> None:
    fake.inject(
        httpx.Response(200, text="<html>hello</html>", headers={"Content-Type": "text/html"})
    )
    with pytest.raises(ApiError, match=r"not JSON .*point at a corral server"):
        client.cluster()


def test_connection_refused_tells_the_operator_what_to_do(
    fake: FakeCorralApi, client: CorralClient
) -> None:
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    fake.inject(refused, times=2)
    with pytest.raises(Unavailable) as caught:
        client.cluster()
    exc = caught.value
    assert exc.exit_code == 5
    assert exc.status is None
    assert exc.message == (
        "cannot reach corral at http://corral.test:8700: connection refused — "
        "is `corral agent` running? set CORRAL_ADDR or --addr"
    )
    assert exc.__cause__ is refused


def test_connection_refused_by_a_real_closed_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    expected = re.escape(f"127.0.0.1:{port}: connection refused — is")
    with (
        CorralClient(f"127.0.0.1:{port}", timeout=5) as client,
        pytest.raises(Unavailable, match=expected),
    ):
        client.list_vms()


def test_a_read_timeout_says_the_server_did_not_answer(
    fake: FakeCorralApi, client: CorralClient
) -> None:
    fake.inject(httpx.ReadTimeout("timed out"))
    with pytest.raises(Unavailable, match="did not answer within 10s") as caught:
        client.get_vm("web-1")
    assert caught.value.exit_code == 5


def test_healthz_and_readyz(fake: FakeCorralApi, client: CorralClient) -> None:
    assert client.healthz() is True
    fake.inject(_problem(503, "unavailable", "no leader"), path="/readyz")
    assert client.readyz() is False
