"""The root command: --addr / CORRAL_ADDR, -o, error reporting, exit codes, extension, main()."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import typer

from corral.cli import CliConfig, app
from corral.client import NotFound
from corral.client.testing import FakeCorralApi

from .support import Cli, squash

SRC = Path(__file__).resolve().parents[3] / "src"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _recording_config(seen: list[httpx.URL]) -> CliConfig:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, json={"items": [], "next_cursor": None, "revision": 1})

    return CliConfig(transport=httpx.MockTransport(handler), force_terminal=False)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((), {}, "http://127.0.0.1:8700/api/v1/vms"),
        ((), {"CORRAL_ADDR": "10.1.2.3:9000"}, "http://10.1.2.3:9000/api/v1/vms"),
        ((), {"CORRAL_ADDR": "https://corral.example"}, "https://corral.example/api/v1/vms"),
        (("--addr", "h2"), {"CORRAL_ADDR": "h1:1"}, "http://h2:8700/api/v1/vms"),
        (("--addr", "http://h3:7000/"), {}, "http://h3:7000/api/v1/vms"),
    ],
)
def test_addr_from_flag_or_env_with_or_without_scheme(
    cli: Cli, args: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    seen: list[httpx.URL] = []
    result = cli(*args, "vm", "ls", env=env, config=_recording_config(seen))
    assert result.exit_code == 0, result.output
    assert [str(url) for url in seen] == [expected]


def test_a_bad_addr_is_a_usage_error(cli: Cli) -> None:
    result = cli("vm", "ls", env={"CORRAL_ADDR": "ftp://h"})
    assert result.exit_code == 2
    assert "Invalid value for '--addr' / CORRAL_ADDR: 'ftp://h' uses 'ftp'" in squash(result.stderr)


def test_an_unknown_output_format_is_a_usage_error(cli: Cli) -> None:
    result = cli("vm", "ls", "-o", "yaml")
    assert result.exit_code == 2
    assert "'yaml' is not one of 'table', 'json'" in squash(result.stderr)


def test_connection_refused_exits_5_with_advice(cli: Cli, fake: FakeCorralApi) -> None:
    fake.inject(httpx.ConnectError("[Errno 111] Connection refused"), times=2)
    result = cli("vm", "ls")
    assert result.exit_code == 5
    assert result.stderr == (
        "error: cannot reach corral at http://127.0.0.1:8700: connection refused — "
        "is `corral agent` running? set CORRAL_ADDR or --addr\n"
    )


def test_a_real_refused_connection_exits_5(cli: Cli) -> None:
    port = _closed_port()
    result = cli("--addr", f"127.0.0.1:{port}", "node", "ls", config=CliConfig())
    assert result.exit_code == 5
    assert f"cannot reach corral at http://127.0.0.1:{port}: connection refused" in result.stderr


def test_server_unavailable_exits_5_with_retry_after(cli: Cli, fake: FakeCorralApi) -> None:
    body = {
        "type": "https://corral.dev/errors/unavailable",
        "title": "Unavailable",
        "status": 503,
        "detail": "no leader elected yet",
        "request_id": "req-x",
    }
    fake.inject(httpx.Response(503, json=body, headers={"Retry-After": "2"}), times=2)
    result = cli("cluster", "status")
    assert result.exit_code == 5
    assert result.stderr == "error: no leader elected yet\nretry after: 2s\nrequest id: req-x\n"


def test_unschedulable_lists_each_nodes_reason(cli: Cli, fake: FakeCorralApi) -> None:
    body = {
        "type": "https://corral.dev/errors/unschedulable",
        "title": "Unschedulable",
        "status": 409,
        "detail": "no node can run vm big",
        "reasons": [
            {"node": "n1", "reason": "insufficient memory"},
            {"node": "n2", "reason": "not ready"},
        ],
    }
    fake.inject(httpx.Response(409, json=body))
    result = cli("vm", "create", "big")
    assert result.exit_code == 4
    assert result.stderr.splitlines() == [
        "error: no node can run vm big",
        "  n1: insufficient memory",
        "  n2: not ready",
    ]


def test_a_plain_text_server_error_exits_1(cli: Cli, fake: FakeCorralApi) -> None:
    fake.inject(httpx.Response(500, text="Internal Server Error", headers={"X-Request-Id": "r-5"}))
    result = cli("vm", "show", "web-1")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: HTTP 500 Internal Server Error")
    assert lines[-1] == "request id: r-5"


@pytest.fixture
def extra_command() -> Iterator[None]:
    """A command another module adds to `app`, removed again afterwards."""

    @app.command("lookup")
    def lookup(name: str) -> None:
        raise NotFound(f"thing {name} not found", request_id="req-ext")

    yield
    app.registered_commands.pop()


@pytest.mark.usefixtures("extra_command")
def test_commands_added_by_other_modules_get_the_same_error_handling(cli: Cli) -> None:
    result = cli("lookup", "x")
    assert result.exit_code == 3
    assert result.stderr == "error: thing x not found\nrequest id: req-ext\n"


def test_sub_apps_can_be_added(cli: Cli) -> None:
    extra = typer.Typer(name="extra")

    @extra.command("hello")
    def hello() -> None:
        typer.echo("hi")

    app.add_typer(extra, name="extra")
    try:
        result = cli("extra", "hello")
    finally:
        app.registered_groups.pop()
    assert (result.exit_code, result.stdout) == (0, "hi\n")


def test_main_exits_with_the_mapped_code() -> None:
    port = _closed_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "CORRAL_ADDR": f"127.0.0.1:{port}"}
    env.pop("CORRAL_OUTPUT", None)
    code = "from corral.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, "-o", "json", "vm", "ls"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 5
    assert done.stdout == ""
    assert "connection refused — is `corral agent` running?" in done.stderr


def test_json_output_is_valid_json_for_scripts(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("-o", "json", "vm", "ls", "--label", "tier=web")
    assert [vm["name"] for vm in json.loads(result.stdout)["items"]] == ["web-1", "web-2"]
