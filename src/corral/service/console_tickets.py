"""Short-lived tickets that open a VM's interactive console (serial or VNC) over a WebSocket.

A browser cannot put a token in a WebSocket's headers, so the API hands out a ticket first
(``POST /api/v1/vms/{name}/console/ticket``) and the WebSocket carries it in its query string.
A ticket is ``<payload>.<signature>``, both base64url without padding: the payload is compact
JSON naming the VM (name and id), the console kind, the expiry (Unix seconds) and a random
nonce; the signature is HMAC-SHA256 over the payload with a key derived from a secret every
host of the cluster holds (the cluster's gossip key, with a label of its own so the two uses
never mix). Any host can therefore check a ticket, compute-only hosts included, without etcd.

Tickets are single-use on the host that serves the console: ``verify(consume=True)``
remembers the nonce until the ticket expires and refuses it afterwards. A server that only
forwards the WebSocket checks it without consuming it; the serving host consumes it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from corral.errors import CorralError

__all__ = [
    "CONSOLE_KINDS",
    "DEFAULT_TICKET_TTL_S",
    "ConsoleKind",
    "ConsoleTickets",
    "Ticket",
    "TicketRefused",
    "derive_ticket_key",
]

ConsoleKind = Literal["serial", "vnc"]
CONSOLE_KINDS: tuple[str, ...] = get_args(ConsoleKind)
DEFAULT_TICKET_TTL_S = 60.0
# Hosts' clocks differ a little; a ticket is honoured this much past its expiry.
_CLOCK_SKEW_S = 5.0
_LABEL = b"corral/console-ticket/v1"
_MAX_TICKET_CHARS = 1024


class TicketRefused(CorralError):
    """The ticket is missing, malformed, forged, expired, used, or for another VM or console.

    ``detail`` says which, and that a new ticket is the way forward.
    """

    type_slug = "unauthorized"
    title = "Console ticket refused"
    status = 401


@dataclass(frozen=True)
class Ticket:
    """What a valid ticket grants: one ``kind`` console of VM ``vm`` (id ``vm_id``)."""

    vm: str
    vm_id: str
    kind: ConsoleKind
    expires_at: float  # Unix seconds
    nonce: str
    token: str  # the ticket as issued (what goes into ``?ticket=``)


def derive_ticket_key(cluster_secret: str) -> bytes:
    """The HMAC key for tickets, derived from a cluster-wide secret (e.g. the gossip key)."""
    if not cluster_secret:
        raise ValueError("console tickets need a cluster secret; this host has none yet")
    return hmac.new(cluster_secret.encode(), _LABEL, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _new_ticket_hint(vm: str) -> str:
    return f"get a new one with POST /api/v1/vms/{vm}/console/ticket"


class ConsoleTickets:
    """Issues and checks console tickets with one key; remembers used nonces until expiry.

    ``clock`` returns Unix seconds (tests inject one). Not thread-safe; one event loop.
    """

    def __init__(
        self,
        key: bytes,
        *,
        ttl_s: float = DEFAULT_TICKET_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(key) < 16:
            raise ValueError("a console ticket key must be at least 16 bytes")
        self._key = key
        self.ttl_s = ttl_s
        self._clock = clock
        self._used: dict[str, float] = {}  # nonce -> expires_at

    @classmethod
    def from_secret(
        cls,
        cluster_secret: str,
        *,
        ttl_s: float = DEFAULT_TICKET_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> ConsoleTickets:
        """Tickets keyed by ``derive_ticket_key(cluster_secret)``."""
        return cls(derive_ticket_key(cluster_secret), ttl_s=ttl_s, clock=clock)

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())

    def issue(self, vm: str, vm_id: str, kind: ConsoleKind) -> Ticket:
        """A new ticket for ``kind`` console of the VM, valid for ``ttl_s`` seconds."""
        if kind not in CONSOLE_KINDS:
            raise ValueError(f"console kind must be one of {', '.join(CONSOLE_KINDS)}")
        expires_at = round(self._clock() + self.ttl_s, 3)
        nonce = secrets.token_urlsafe(12)
        claims = {"vm": vm, "id": vm_id, "k": kind, "exp": expires_at, "n": nonce}
        payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        token = f"{payload}.{self._sign(payload)}"
        return Ticket(vm, vm_id, kind, expires_at, nonce, token)

    def verify(self, token: str | None, vm: str, kind: ConsoleKind, *, consume: bool) -> Ticket:
        """The ticket's claims if it grants ``kind`` console of VM ``vm`` now; TicketRefused
        (saying why and what to do) otherwise. ``consume`` marks it used: a second ``verify``
        with ``consume=True`` is refused. The VM id is returned for the caller to compare
        with the VM it serves."""
        hint = _new_ticket_hint(vm)
        if not token:
            raise TicketRefused(f"ticket: required (a console needs a ticket; {hint})")
        if len(token) > _MAX_TICKET_CHARS or token.count(".") != 1:
            raise TicketRefused(f"ticket: not a console ticket; {hint}")
        payload, signature = token.split(".")
        if not hmac.compare_digest(signature.encode(), self._sign(payload).encode()):
            raise TicketRefused(
                f"ticket: bad signature (not issued by this cluster, or altered); {hint}"
            )
        try:
            claims = json.loads(_unb64(payload))
            ticket = Ticket(
                vm=str(claims["vm"]),
                vm_id=str(claims["id"]),
                kind=claims["k"],
                expires_at=float(claims["exp"]),
                nonce=str(claims["n"]),
                token=token,
            )
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            # Signed by us but unreadable: only a bug (or another version) can do that.
            raise TicketRefused(f"ticket: unreadable claims ({exc}); {hint}") from None
        now = self._clock()
        if ticket.vm != vm:
            raise TicketRefused(f"ticket: issued for vm {ticket.vm!r}, not {vm!r}; {hint}")
        if ticket.kind != kind:
            raise TicketRefused(
                f"ticket: issued for the {ticket.kind} console, not the {kind} console; "
                f'{_new_ticket_hint(vm)} with {{"console": "{kind}"}}'
            )
        if now > ticket.expires_at + _CLOCK_SKEW_S:
            raise TicketRefused(
                f"ticket: expired {now - ticket.expires_at:.0f} s ago (tickets last "
                f"{self.ttl_s:.0f} s); {hint}"
            )
        if consume:
            self._forget_expired(now)
            if ticket.nonce in self._used:
                raise TicketRefused(f"ticket: already used (a ticket opens one console); {hint}")
            self._used[ticket.nonce] = ticket.expires_at
        return ticket

    def _forget_expired(self, now: float) -> None:
        gone = [n for n, exp in self._used.items() if now > exp + _CLOCK_SKEW_S]
        for nonce in gone:
            del self._used[nonce]
