"""The serf RPC client: framing and decoding as pure functions, the client against a fake agent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest

from corral.cluster.serf_rpc import (
    Frame,
    Member,
    MemberEvent,
    QueryEvent,
    ResponseFramer,
    SerfClient,
    SerfError,
    UserEvent,
    decode_event,
    decode_member,
    encode_request,
    is_response_header,
)
from corral.errors import CorralError
from tests.unit.cluster.fake_serf import MEMBER, FakeConnection, FakeSerf


def _pack(*objs: object) -> bytes:
    return b"".join(msgpack.packb(o) for o in objs)


def _header(seq: int, error: str = "") -> dict[str, Any]:
    return {"Seq": seq, "Error": error}


# --- framing ----------------------------------------------------------------------------------


def test_request_is_a_header_then_a_body_only_when_given() -> None:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(encode_request("members", 3) + encode_request("join", 4, {"Existing": ["a"]}))
    assert list(unpacker) == [
        {"Command": "members", "Seq": 3},
        {"Command": "join", "Seq": 4},
        {"Existing": ["a"]},
    ]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"Seq": 1, "Error": ""}, True),
        ({"Seq": 1, "Error": "boom"}, True),
        ({"Seq": "1", "Error": ""}, False),
        ({"Seq": 1, "Error": "", "Members": []}, False),
        ({"Members": []}, False),
        ({"Num": 1}, False),
        ([1, ""], False),
    ],
)
def test_response_header_shape(obj: object, expected: bool) -> None:
    assert is_response_header(obj) is expected


def test_answers_out_of_order_interleaved_with_stream_records_are_cut_correctly() -> None:
    framer = ResponseFramer()
    framer.expect(1, body=True)  # members
    framer.expect(2, body=False)  # tags
    framer.expect_stream(3)
    record = {"Event": "member-join", "Members": [MEMBER]}
    wire = _pack(
        _header(3),  # stream acknowledged
        _header(2),  # tags answered before members
        _header(3),
        record,
        _header(1),
        {"Members": [MEMBER]},
        _header(3),
        record,
    )
    # Byte by byte: a frame may end anywhere in a read.
    frames = [f for i in range(len(wire)) for f in framer.feed(wire[i : i + 1])]
    assert frames == [
        Frame(3, ""),
        Frame(2, ""),
        Frame(3, "", record),
        Frame(1, "", {"Members": [MEMBER]}),
        Frame(3, "", record),
    ]


def test_an_error_answer_still_carries_the_body_of_its_command() -> None:
    framer = ResponseFramer()
    framer.expect(7, body=True)  # join answers {"Num": 0} along with its error
    framer.expect(8, body=False)
    frames = framer.feed(_pack(_header(7, "Failed to join"), {"Num": 0}, _header(8)))
    assert frames == [Frame(7, "Failed to join", {"Num": 0}), Frame(8, "")]


def test_authentication_required_comes_without_a_body() -> None:
    framer = ResponseFramer()
    framer.expect(1, body=True)
    framer.expect(2, body=True)
    wire = _pack(_header(1, "Authentication required"), _header(2), {"Members": []})
    assert framer.feed(wire) == [Frame(1, "Authentication required"), Frame(2, "", {"Members": []})]


def test_a_body_newer_agents_add_to_a_bare_answer_is_dropped() -> None:
    framer = ResponseFramer()
    framer.expect(1, body=False)  # force-leave: newer agents answer {"Exists": bool} as well
    framer.expect(2, body=True)
    wire = _pack(_header(1), {"Exists": True}, _header(2), {"Num": 1})
    assert framer.feed(wire) == [Frame(1, ""), Frame(2, "", {"Num": 1})]
    assert framer.dropped == 1


def test_records_of_a_stream_nobody_expects_any_more_are_dropped() -> None:
    framer = ResponseFramer()
    framer.expect(5, body=False)
    wire = _pack(_header(9), {"Event": "member-join", "Members": []}, _header(5))
    assert framer.feed(wire) == [Frame(9, ""), Frame(5, "")]


def test_a_refused_stream_expects_no_records() -> None:
    framer = ResponseFramer()
    framer.expect_stream(4)
    framer.expect(5, body=True)
    wire = _pack(_header(4, "Invalid event filter"), _header(5), {"Num": 2})
    assert framer.feed(wire) == [Frame(4, "Invalid event filter"), Frame(5, "", {"Num": 2})]


@pytest.mark.parametrize(
    "wire",
    [
        _pack({"Members": []}),  # a body where a header belongs
        _pack(_header(1), {"Num": 1}, {"Num": 2}),  # two bodies after a bare answer
        b"\xc1",  # a byte msgpack never uses
    ],
    ids=["body-first", "two-bodies", "reserved-byte"],
)
def test_an_unframeable_stream_raises_serf_error(wire: bytes) -> None:
    framer = ResponseFramer()
    framer.expect(1, body=False)
    with pytest.raises(SerfError):
        framer.feed(wire)


# --- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        (b"\x7f\x00\x00\x02", "127.0.0.2"),
        (b"\x00" * 10 + b"\xff\xff" + b"\x0a\x00\x00\x01", "10.0.0.1"),  # IPv4-mapped
        (b"\x00" * 15 + b"\x01", "::1"),
    ],
)
def test_member_addresses_decode_to_text(addr: bytes, expected: str) -> None:
    member = decode_member({**MEMBER, "Addr": addr})
    assert member.addr == expected


def test_member_decodes_every_field_and_is_immutable() -> None:
    member = decode_member(MEMBER)
    assert member == Member(
        name="n1",
        addr="127.0.0.1",
        port=7946,
        tags={"role": "server"},
        status="alive",
        protocol_min=1,
        protocol_max=5,
        protocol_cur=2,
        delegate_min=2,
        delegate_max=5,
        delegate_cur=5,
    )
    assert member.gossip_addr == "127.0.0.1:7946"
    assert hash(member) == hash(decode_member(MEMBER))
    with pytest.raises(TypeError):
        member.tags["role"] = "x"  # type: ignore[index]


def test_ipv6_member_gossip_address_is_bracketed() -> None:
    member = decode_member({**MEMBER, "Addr": b"\x00" * 15 + b"\x01"})
    assert member.gossip_addr == "[::1]:7946"


def test_nil_tags_mean_no_tags() -> None:
    assert decode_member({**MEMBER, "Tags": None}).tags == {}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"Name": None}, "Name"),
        ({"Addr": b"\x01\x02"}, "Addr"),
        ({"Port": "7946"}, "Port"),
        ({"Status": 1}, "Status"),
        ({"Tags": {"a": 1}}, "Tags"),
        ({"ProtocolCur": True}, "ProtocolCur"),
    ],
)
def test_malformed_member_names_the_field(change: dict[str, Any], match: str) -> None:
    with pytest.raises(SerfError, match=match):
        decode_member({**MEMBER, **change})


def test_events_decode_to_their_types() -> None:
    member_event = decode_event({"Event": "member-failed", "Members": [MEMBER]})
    assert member_event == MemberEvent("member-failed", (decode_member(MEMBER),))
    user = {"Event": "user", "LTime": 4, "Name": "deploy", "Payload": b"v2", "Coalesce": True}
    assert decode_event(user) == UserEvent(4, "deploy", b"v2", True)
    query = {"Event": "query", "ID": 9, "LTime": 5, "Name": "ping", "Payload": None}
    assert decode_event(query) == QueryEvent(9, 5, "ping", b"")


@pytest.mark.parametrize(
    "raw", [{"Event": "member-teleport", "Members": []}, {"Event": "user"}, ["member-join"]]
)
def test_malformed_events_raise_serf_error(raw: object) -> None:
    with pytest.raises(SerfError):
        decode_event(raw)


def test_serf_error_is_a_corral_error_with_a_stable_type() -> None:
    err = SerfError("serf is down")
    assert isinstance(err, CorralError)
    assert (err.type_slug, err.status, err.detail) == ("gossip", 503, "serf is down")


# --- the client against a fake agent -----------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeSerf]:
    server = FakeSerf()
    yield server
    await server.close()


@pytest.fixture
async def client(fake: FakeSerf) -> AsyncIterator[SerfClient]:
    c = await SerfClient.connect(await fake.start(), timeout_s=2.0)
    yield c
    await c.close()


async def test_connect_handshakes_with_version_1_and_authenticates(fake: FakeSerf) -> None:
    async with await SerfClient.connect(await fake.start(), auth_key="t0k") as c:
        assert not c.closed
    assert fake.requests[:2] == [("handshake", 0, {"Version": 1}), ("auth", 1, {"AuthKey": "t0k"})]


async def test_unreachable_agent_raises_serf_error(fake: FakeSerf) -> None:
    address = await fake.start()
    await fake.close()
    with pytest.raises(SerfError, match="cannot reach serf RPC"):
        await SerfClient.connect(address, timeout_s=1.0)


async def test_requests_carry_the_fields_serf_expects(fake: FakeSerf, client: SerfClient) -> None:
    await client.members_filtered(tags={"role": "server"}, status="alive")
    await client.tags(set={"zone": "a"}, delete=["old"])
    await client.force_leave("n9")
    assert fake.requests[1:] == [
        ("members-filtered", 1, {"Tags": {"role": "server"}, "Status": "alive", "Name": ""}),
        ("tags", 2, {"Tags": {"zone": "a"}, "DeleteTags": ["old"]}),
        ("force-leave", 3, {"Node": "n9"}),
    ]


async def test_a_bad_filter_regex_is_refused_before_it_can_drop_the_connection(
    fake: FakeSerf, client: SerfClient
) -> None:
    with pytest.raises(SerfError, match=r"tags\[role\]: not a valid regular expression"):
        await client.members_filtered(tags={"role": "("})
    assert [r[0] for r in fake.requests] == ["handshake"]
    assert (await client.members())[0].name == "n1"


async def test_calls_and_a_stream_share_one_connection_in_any_order(
    fake: FakeSerf, client: SerfClient
) -> None:
    release = asyncio.Event()

    async def slow_members(conn: FakeConnection, seq: int, body: Any) -> None:
        await release.wait()
        conn.answer(seq, {"Members": [MEMBER, {**MEMBER, "Name": "n2"}]})

    fake.handlers["members"] = slow_members
    async with client.stream("member-join") as events:
        members = asyncio.create_task(client.members())
        await asyncio.wait_for(fake.arrived("members").wait(), 2.0)
        stats = await client.stats()  # answered while members is still outstanding
        fake.connections[0].event({"Event": "member-join", "Members": [MEMBER]})
        event = await asyncio.wait_for(anext(events), 2.0)
        release.set()
        assert [m.name for m in await members] == ["n1", "n2"]
    assert stats["agent"] == {"name": "n1"}
    assert event == MemberEvent("member-join", (decode_member(MEMBER),))
    assert [r[0] for r in fake.requests] == ["handshake", "stream", "members", "stats", "stop"]


async def test_serf_errors_are_raised_and_the_client_stays_usable(
    fake: FakeSerf, client: SerfClient
) -> None:
    async def failing_join(conn: FakeConnection, seq: int, body: Any) -> None:
        conn.answer(seq, {"Num": 0}, error="1 error occurred:\n\t* Failed to join 10.0.0.9\n\n")

    fake.handlers["join"] = failing_join
    with pytest.raises(SerfError, match=r"join failed: 1 error occurred: \* Failed to join"):
        await client.join(["10.0.0.9"])
    assert len(await client.members()) == 1


async def test_a_late_answer_after_a_timeout_does_not_misalign_the_next(
    fake: FakeSerf, client: SerfClient
) -> None:
    late = asyncio.Event()

    async def late_stats(conn: FakeConnection, seq: int, body: Any) -> None:
        await late.wait()
        conn.answer(seq, {"agent": {"name": "late"}})

    fake.handlers["stats"] = late_stats
    client.timeout_s = 0.2
    with pytest.raises(SerfError, match="did not answer stats"):
        await client.stats()
    late.set()
    assert (await client.members())[0].name == "n1"


async def test_losing_the_connection_ends_streams_and_calls_with_serf_error(
    fake: FakeSerf, client: SerfClient
) -> None:
    never = asyncio.Event()

    async def hang(conn: FakeConnection, seq: int, body: Any) -> None:
        await never.wait()

    fake.handlers["stats"] = hang
    async with client.stream() as events:
        pending = asyncio.create_task(client.stats())
        await asyncio.sleep(0.05)
        fake.connections[0].writer.close()
        with pytest.raises(SerfError, match="closed by the agent"):
            await asyncio.wait_for(anext(events), 2.0)
        with pytest.raises(SerfError):
            await pending
    assert client.closed
    with pytest.raises(SerfError, match="closed by the agent"):
        await client.members()


async def test_closing_the_client_ends_open_streams_cleanly(client: SerfClient) -> None:
    async with client.stream() as events:
        await client.close()
        assert [e async for e in events] == []


async def test_a_refused_stream_raises_at_start(fake: FakeSerf, client: SerfClient) -> None:
    async def refuse(conn: FakeConnection, seq: int, body: Any) -> None:
        conn.answer(seq, error="Invalid event filter")

    fake.handlers["stream"] = refuse
    with pytest.raises(SerfError, match="refused stream 'member-jion'"):
        await client.stream("member-jion").start()


async def test_a_stream_read_too_slowly_ends_with_serf_error_after_what_it_kept(
    fake: FakeSerf, client: SerfClient
) -> None:
    async with client.stream(max_pending=2) as events:
        for name in ("a", "b", "c"):
            fake.connections[0].event(
                {"Event": "member-join", "Members": [{**MEMBER, "Name": name}]}
            )
        await asyncio.sleep(0.1)
        names = [(await anext(events)).members[0].name for _ in range(2)]  # type: ignore[union-attr]
        with pytest.raises(SerfError, match="fell behind"):
            await anext(events)
    assert names == ["a", "b"]
