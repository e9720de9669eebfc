"""Console tickets: what they grant, and every way one is refused."""

from __future__ import annotations

import base64
import json

import pytest

from corral.service.console_tickets import (
    ConsoleTickets,
    TicketRefused,
    derive_ticket_key,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tickets(clock: Clock) -> ConsoleTickets:
    return ConsoleTickets.from_secret("gossip-key-of-the-cluster", ttl_s=60, clock=clock)


def test_a_ticket_opens_its_vms_console_once(tickets: ConsoleTickets) -> None:
    issued = tickets.issue("web-1", "id-1", "serial")
    # A forwarding server checks without using it up; the serving host uses it.
    assert tickets.verify(issued.token, "web-1", "serial", consume=False).vm_id == "id-1"
    claims = tickets.verify(issued.token, "web-1", "serial", consume=True)
    assert (claims.vm, claims.vm_id, claims.kind) == ("web-1", "id-1", "serial")
    with pytest.raises(TicketRefused, match=r"already used.*POST /api/v1/vms/web-1/console/ticket"):
        tickets.verify(issued.token, "web-1", "serial", consume=True)


def test_every_host_of_the_cluster_accepts_it(clock: Clock) -> None:
    server = ConsoleTickets.from_secret("k" * 44, clock=clock)
    compute_host = ConsoleTickets.from_secret("k" * 44, clock=clock)
    issued = server.issue("web-1", "id-1", "vnc")
    assert compute_host.verify(issued.token, "web-1", "vnc", consume=True).kind == "vnc"


def test_an_expired_ticket_is_refused(tickets: ConsoleTickets, clock: Clock) -> None:
    issued = tickets.issue("web-1", "id-1", "serial")
    clock.now += 60 + 4  # within the allowance for clock skew between hosts
    tickets.verify(issued.token, "web-1", "serial", consume=False)
    clock.now += 10
    with pytest.raises(TicketRefused, match=r"expired 14 s ago.*get a new one"):
        tickets.verify(issued.token, "web-1", "serial", consume=True)


@pytest.mark.parametrize(
    ("vm", "kind", "message"),
    [
        ("web-2", "serial", "issued for vm 'web-1', not 'web-2'"),
        ("web-1", "vnc", "issued for the serial console, not the vnc console"),
    ],
)
def test_a_ticket_for_another_vm_or_console_is_refused(
    tickets: ConsoleTickets, vm: str, kind: str, message: str
) -> None:
    issued = tickets.issue("web-1", "id-1", "serial")
    with pytest.raises(TicketRefused, match=message):
        tickets.verify(issued.token, vm, kind, consume=True)  # type: ignore[arg-type]
    # A refused attempt does not use the ticket up.
    tickets.verify(issued.token, "web-1", "serial", consume=True)


def _tamper(token: str, **changes: object) -> str:
    payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    raw = json.dumps(claims, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode() + "." + signature


def test_forged_and_altered_tickets_are_refused(tickets: ConsoleTickets, clock: Clock) -> None:
    issued = tickets.issue("web-1", "id-1", "serial")
    other_cluster = ConsoleTickets.from_secret("another-cluster-key", clock=clock)
    forged = other_cluster.issue("web-1", "id-1", "serial")
    for token in (
        forged.token,
        _tamper(issued.token, exp=issued.expires_at + 3600),
        _tamper(issued.token, vm="db-1"),
        issued.token[:-2],
    ):
        with pytest.raises(TicketRefused, match="bad signature"):
            tickets.verify(token, "web-1", "serial", consume=True)


@pytest.mark.parametrize("token", [None, "", "no-dot-here", "a.b.c", "x" * 2000])
def test_missing_or_malformed_tickets_are_refused(
    tickets: ConsoleTickets, token: str | None
) -> None:
    with pytest.raises(TicketRefused, match=r"ticket: .*get a new one") as info:
        tickets.verify(token, "web-1", "serial", consume=True)
    assert info.value.status == 401


def test_used_nonces_are_forgotten_once_their_ticket_expired(
    tickets: ConsoleTickets, clock: Clock
) -> None:
    for _ in range(5):
        tickets.verify(
            tickets.issue("web-1", "id-1", "serial").token, "web-1", "serial", consume=True
        )
    assert len(tickets._used) == 5
    clock.now += 120
    tickets.verify(tickets.issue("web-1", "id-1", "serial").token, "web-1", "serial", consume=True)
    assert len(tickets._used) == 1


def test_the_key_needs_a_secret_and_is_not_the_secret() -> None:
    with pytest.raises(ValueError, match="cluster secret"):
        derive_ticket_key("")
    assert derive_ticket_key("abc") != b"abc" and len(derive_ticket_key("abc")) == 32
