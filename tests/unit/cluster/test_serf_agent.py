"""The serf supervisor's contract that needs no serf: argument rules, keys, start failures."""

from __future__ import annotations

import ast
import base64
import importlib
import sys
from pathlib import Path
from typing import Any

import pytest

import corral.cluster.serf
import corral.cluster.serf_rpc
from corral.cluster.serf import SerfAgent, generate_key
from corral.cluster.serf_rpc import SerfError

KEY = generate_key()


def _agent(tmp_path: Path, **kw: Any) -> SerfAgent:
    args: dict[str, Any] = {
        "node": "n1",
        "bind_addr": "127.0.0.1",
        "bind_port": 7946,
        "rpc_port": 7373,
        "data_dir": tmp_path,
        "encrypt_key": KEY,
        "tags": {"role": "server"},
    }
    args.update(kw)
    return SerfAgent(**args)


def test_generated_keys_are_fresh_32_byte_base64() -> None:
    keys = {generate_key() for _ in range(20)}
    assert len(keys) == 20
    assert {len(base64.b64decode(k, validate=True)) for k in keys} == {32}


@pytest.mark.parametrize("size", [16, 24, 32])
def test_every_aes_key_size_is_accepted(tmp_path: Path, size: int) -> None:
    _agent(tmp_path, encrypt_key=base64.b64encode(bytes(size)).decode())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"node": ""}, "node: must be a non-empty name"),
        ({"node": "a b"}, "node: must be a non-empty name"),
        ({"bind_addr": "localhost"}, "bind_addr: must be an IP address"),
        ({"bind_addr": "0.0.0.0"}, "bind_addr: must be a specific address"),
        ({"bind_port": 0}, "bind_port: must be in 1..65535"),
        ({"rpc_port": 70000}, "rpc_port: must be in 1..65535"),
        ({"encrypt_key": "not base64!"}, "encrypt_key: must be base64 of 16, 24 or 32 bytes"),
        ({"encrypt_key": base64.b64encode(bytes(8)).decode()}, "encrypt_key: must be base64"),
        ({"tags": {"a=b": "c"}}, "tags: keys must be non-empty and without '='"),
        ({"tags": {"inventory": "x" * 600}}, "tags: must encode to at most 512 bytes"),
        ({"profile": "lab"}, "profile: must be one of lan, wan, local"),
    ],
)
def test_bad_arguments_are_refused_naming_the_field(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _agent(tmp_path, **change)


def test_addresses_are_what_peers_and_clients_dial(tmp_path: Path) -> None:
    agent = _agent(tmp_path, bind_addr="::1", bind_port=8704, rpc_port=8705)
    assert agent.gossip_address == "[::1]:8704"
    assert agent.rpc_address == "127.0.0.1:8705"


async def test_a_serf_that_exits_at_once_fails_start_with_its_log(tmp_path: Path) -> None:
    agent = _agent(tmp_path, binary="false")
    with pytest.raises(SerfError, match="serf exited with code 1 during start"):
        await agent.start(timeout_s=5.0)
    assert not agent.healthy
    await agent.stop()


async def test_a_missing_serf_binary_fails_start_with_serf_error(tmp_path: Path) -> None:
    agent = _agent(tmp_path, binary=str(tmp_path / "no-such-serf"))
    with pytest.raises(SerfError, match="cannot start serf"):
        await agent.start()
    assert agent.pid is None


@pytest.mark.parametrize("module", [corral.cluster.serf, corral.cluster.serf_rpc])
def test_every_name_in_all_is_importable(module: Any) -> None:
    reloaded = importlib.import_module(module.__name__)
    assert [name for name in reloaded.__all__ if not hasattr(reloaded, name)] == []


@pytest.mark.parametrize("module", [corral.cluster.serf, corral.cluster.serf_rpc])
def test_serf_modules_import_only_stdlib_msgpack_and_corral_errors(module: Any) -> None:
    path = Path(module.__file__)
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    # corral.cluster.child is the stdlib-only helper the etcd and serf supervisors share.
    allowed = (
        "__future__",
        "msgpack",
        "corral.errors",
        "corral.cluster.serf_rpc",
        "corral.cluster.child",
    )
    bad = [n for n in names if n.split(".")[0] not in sys.stdlib_module_names and n not in allowed]
    assert bad == []
