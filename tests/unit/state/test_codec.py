from __future__ import annotations

import json

import pytest

from corral.model import Target, Task, TaskSpec, Vm, VmSpec, utcnow
from corral.state.codec import CodecError, decode, encode


def _vm() -> Vm:
    now = utcnow()
    return Vm(
        name="web-1",
        id="0f",
        created_at=now,
        updated_at=now,
        spec=VmSpec(vcpus=2, memory_mib=512, labels={"tier": "web"}),
        create_revision=5,
        mod_revision=9,
    )


def test_round_trip_keeps_data_and_takes_revisions_from_etcd() -> None:
    raw = encode("vm", _vm())
    back = decode("vm", raw, Vm, create_revision=12, mod_revision=40)
    assert back.spec.labels == {"tier": "web"}
    assert (back.create_revision, back.mod_revision) == (12, 40)
    assert "mod_revision" not in json.loads(raw)["data"]


def test_unknown_version_fails_loudly_and_says_upgrade() -> None:
    envelope = json.loads(encode("vm", _vm()))
    envelope["v"] = 2
    with pytest.raises(CodecError, match=r"schema version 2.*upgrade corral"):
        decode("vm", json.dumps(envelope).encode(), Vm)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"not json", "not JSON"),
        (b'{"schema": "other"}', "not a corral record"),
        (b'{"schema": "corral", "kind": "node", "v": 1, "data": {}}', "expected a 'vm' record"),
        (b'{"schema": "corral", "kind": "vm", "v": 1, "data": {"name": 3}}', "does not validate"),
    ],
)
def test_bad_records_are_refused(raw: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode("vm", raw, Vm)


def test_encode_refuses_a_model_of_another_kind() -> None:
    now = utcnow()
    task = Task(
        name="t",
        id="t",
        created_at=now,
        updated_at=now,
        spec=TaskSpec(action="create", target=Target(kind="vm", name="a")),
    )
    with pytest.raises(CodecError, match="cannot store Task as kind 'vm'"):
        encode("vm", task)
