"""Test hosts in network namespaces the tests create themselves, so a network can be cut.

Agents on 127.0.0.x cannot be partitioned (everything goes over ``lo``). Here every host is a
namespace ``crl-nX`` with one veth into a bridge ``crl-br0`` in the root namespace:

    root namespace: crl-br0 10.213.0.1/24 (only so the test process reaches the hosts)
        |- crl-v1 <-> eth0 10.213.0.11/24 in crl-n1
        |- crl-v2 <-> eth0 10.213.0.12/24 in crl-n2
        |- ...

Nothing else is connected: no default route in the namespaces, so the agents can only talk to
each other (and answer the test process) over this bridge. ``cut`` sets a host's veth down in
the root namespace, the model of a pulled cable: every packet to and from that host vanishes
silently, whatever the protocol, until ``heal``. Only ``ip`` (iproute2) is needed.

Every name starts with ``crl-``; ``cleanup`` removes whatever a previous (crashed) run left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BRIDGE",
    "BRIDGE_ADDRESS",
    "Host",
    "InNamespaceResponse",
    "NetnsUnavailable",
    "Network",
    "cleanup",
    "http_in",
]

BRIDGE = "crl-br0"
SUBNET = "10.213.0"
BRIDGE_ADDRESS = f"{SUBNET}.1"
NS_PREFIX = "crl-n"
VETH_PREFIX = "crl-v"


class NetnsUnavailable(RuntimeError):
    """This machine cannot create the namespaces, veths or bridge (not root, no CAP_NET_ADMIN,
    inside a restricted container...)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NetnsUnavailable("`ip` (iproute2) is not installed") from None
    if check and result.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def _namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links() -> list[str]:
    out = _ip("-o", "link", "show", check=False).stdout
    names = []
    for line in out.splitlines():
        # "12: crl-v1@if11: <BROADCAST,...": the name ends at '@' or ':'.
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        names.append(name)
    return names


def _pids_in(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _stop_pids(pids: list[int], timeout_s: float = 10.0) -> None:
    """SIGTERM the given pids (processes a test started in its namespaces), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive = [p for p in pids if os.path.exists(f"/proc/{p}")]
            if not alive:
                return
            time.sleep(0.1)
        pids = alive


def cleanup() -> list[str]:
    """Remove every ``crl-`` namespace (stopping what still runs in it), veth and bridge.

    Returns what was removed, so a caller can say a previous run left something behind.
    """
    removed = []
    for ns in _namespaces():
        if not ns.startswith(NS_PREFIX):
            continue
        _stop_pids(_pids_in(ns))
        _ip("netns", "del", ns, check=False)
        removed.append(f"netns {ns}")
    for link in _links():
        if link.startswith(VETH_PREFIX) or link == BRIDGE:
            _ip("link", "del", link, check=False)
            removed.append(f"link {link}")
    return removed


@dataclass(frozen=True)
class Host:
    """One namespace: ``crl-n<i>``, address ``10.213.0.1<i>``, veth ``crl-v<i>`` in the root."""

    index: int

    @property
    def netns(self) -> str:
        return f"{NS_PREFIX}{self.index}"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{10 + self.index}"

    @property
    def veth(self) -> str:
        """The root-namespace end of the host's cable (plugged into the bridge)."""
        return f"{VETH_PREFIX}{self.index}"

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]


class Network:
    """The bridge and ``count`` hosts. ``build`` raises NetnsUnavailable when not permitted."""

    def __init__(self, count: int) -> None:
        if not 1 <= count <= 9:
            raise ValueError("1 to 9 hosts")
        self.hosts = [Host(i) for i in range(1, count + 1)]
        self.cut_hosts: set[int] = set()

    def build(self) -> Network:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for h in self.hosts:
            _ip("netns", "add", h.netns)
            _ip("link", "add", h.veth, "type", "veth", "peer", "name", f"{h.veth}p")
            _ip("link", "set", f"{h.veth}p", "netns", h.netns)
            _ip("link", "set", h.veth, "master", BRIDGE)
            _ip("link", "set", h.veth, "up")
            ns = ["-n", h.netns]
            _ip(*ns, "link", "set", f"{h.veth}p", "name", "eth0")
            _ip(*ns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            _ip(*ns, "link", "set", "eth0", "up")
            _ip(*ns, "link", "set", "lo", "up")
        return self

    def cut(self, host: Host) -> None:
        """Pull the host's cable: its veth goes down in the root namespace."""
        _ip("link", "set", host.veth, "down")
        self.cut_hosts.add(host.index)

    def heal(self, host: Host) -> None:
        _ip("link", "set", host.veth, "up")
        self.cut_hosts.discard(host.index)

    def heal_all(self) -> None:
        for h in self.hosts:
            if h.index in self.cut_hosts:
                _ip("link", "set", h.veth, "up", check=False)
        self.cut_hosts.clear()

    def destroy(self) -> None:
        cleanup()


@dataclass(frozen=True)
class InNamespaceResponse:
    """What a client inside a namespace got: a status and body, or no answer in time."""

    status: int | None  # None: no answer before the timeout (or the connection failed)
    content_type: str
    body: Any
    error: str
    elapsed_s: float


_CLIENT = """
import json, sys, time, httpx
method, url, body, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
started = time.monotonic()
try:
    r = httpx.request(method, url, content=body or None, timeout=timeout,
                      headers={"content-type": "application/json"} if body else {})
    try:
        data = r.json()
    except ValueError:
        data = r.text
    out = {"status": r.status_code, "content_type": r.headers.get("content-type", ""),
           "body": data, "error": ""}
except httpx.HTTPError as exc:
    out = {"status": None, "content_type": "", "body": None,
           "error": f"{type(exc).__name__}: {exc}"}
out["elapsed_s"] = time.monotonic() - started
print(json.dumps(out))
"""


def http_in(
    host: Host, method: str, url: str, body: Any = None, *, timeout_s: float = 10.0
) -> InNamespaceResponse:
    """An HTTP request made from inside ``host``'s namespace (works while the host is cut)."""
    raw = "" if body is None else json.dumps(body)
    result = subprocess.run(
        [*host.exec_prefix(), sys.executable, "-c", _CLIENT, method, url, raw, str(timeout_s)],
        capture_output=True,
        text=True,
        timeout=timeout_s + 30,
    )
    if result.returncode != 0:
        raise RuntimeError(f"client in {host.netns} failed: {result.stderr.strip()}")
    out = json.loads(result.stdout)
    return InNamespaceResponse(**out)
