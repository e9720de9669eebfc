"""Real agent processes with real etcd on 127.0.0.x, for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

__all__ = ["NETNS_PORTS", "AgentProcess", "free_port"]

# Ports an agent uses inside its own network namespace: nothing else listens there, so the
# defaults always work (http, etcd client, etcd peer, grpc, gossip, gossip rpc).
NETNS_PORTS = (8700, 8702, 8703, 8701, 8704, 8705)


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on ``host`` that this test run has not handed out yet.

    The kernel may give the same ephemeral port to two probes in a row once the first probe's
    socket is closed; two of one agent's ports then collide (gRPC and Serf did, in CI). Serf's
    gossip port needs UDP as well as TCP.
    """
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port in _handed_out:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((host, port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port found on {host}")


@dataclass
class AgentProcess:
    """One ``corral agent`` child. ``start`` waits until /readyz answers 200.

    With ``netns``, the agent runs inside that network namespace (``ip netns exec``), where
    ``bind`` is one of its addresses; the test process reaches it through a bridge, so
    readiness and HTTP checks work unchanged from the root namespace.
    """

    data_dir: Path
    name: str = "n1"
    bind: str = "127.0.0.1"
    env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    netns: str | None = None

    def __post_init__(self) -> None:
        if self.netns is not None:
            # ``bind`` is not an address of this (root) namespace: no port can be probed here.
            (
                default_http,
                self.etcd_client_port,
                self.etcd_peer_port,
                self.grpc_port,
                self.gossip_port,
                self.gossip_rpc_port,
            ) = NETNS_PORTS
            self.http_port = self.http_port or default_http
            return
        self.http_port = self.http_port or free_port(self.bind)
        self.etcd_client_port = free_port(self.bind)
        self.etcd_peer_port = free_port(self.bind)
        self.grpc_port = free_port(self.bind)
        self.gossip_port = free_port(self.bind)
        self.gossip_rpc_port = free_port("127.0.0.1")

    @property
    def url(self) -> str:
        return f"http://{self.bind}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "agent.log"

    def command(self, bootstrap: bool) -> list[str]:
        # ``ip netns exec`` execs the agent itself: the child's pid is the agent's.
        prefix = ["ip", "netns", "exec", self.netns] if self.netns is not None else []
        cmd = [
            *prefix,
            sys.executable,
            "-m",
            "corral",
            "agent",
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--bind",
            self.bind,
            "--http-port",
            str(self.http_port),
            "--etcd-client-port",
            str(self.etcd_client_port),
            "--etcd-peer-port",
            str(self.etcd_peer_port),
            "--grpc-port",
            str(self.grpc_port),
            "--gossip-port",
            str(self.gossip_port),
            "--gossip-rpc-port",
            str(self.gossip_rpc_port),
            *self.extra_args,
        ]
        if bootstrap:
            cmd.append("--bootstrap")
        return cmd

    def join_args(self, token: str) -> list[str]:
        """Arguments for another agent to join the cluster through this one."""
        return ["--join", self.url, "--token", token]

    def start(self, *, bootstrap: bool = True, timeout_s: float = 60.0) -> AgentProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        # Fast fake VMs, and room for the hundreds of small VMs tests create on a 2-CPU host.
        env.update(
            {
                "CORRAL_DRIVER": "fake",
                "CORRAL_FAKE_START_DELAY_S": "0.05",
                "CORRAL_FAKE_STOP_DELAY_S": "0.05",
                "CORRAL_CPU_ALLOCATION_RATIO": "128",
            }
        )
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(bootstrap), stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env
            )
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"agent not ready after {timeout_s}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30.0), **kw)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"agent ignored SIGTERM for {timeout_s}s:\n{self.tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the agent; its etcd dies with it (PR_SET_PDEATHSIG)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._wait_etcd_gone()

    def _wait_etcd_gone(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((self.bind, self.etcd_client_port)) != 0:
                    return
            time.sleep(0.1)
        raise AssertionError("etcd still listening after its agent died")


def wait_for(
    predicate: Callable[[], Any],
    timeout_s: float,
    what: str,
    *,
    poll_s: float = 0.2,
    error: type[Exception] = AssertionError,
) -> Any:
    """Poll until ``predicate`` returns something truthy (HTTP errors count as "not yet")."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except httpx.HTTPError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(poll_s)
    raise error(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def token(agent: AgentProcess, **body: Any) -> str:
    """A new join token's secret, created through ``agent``'s API."""
    r = httpx.post(agent.url + "/api/v1/tokens", json=body, timeout=10)
    assert r.status_code == 201, r.text
    secret: str = r.json()["secret"]
    return secret


def node_states(agent: AgentProcess, timeout_s: float = 10.0) -> dict[str, str]:
    items = httpx.get(agent.url + "/api/v1/nodes", timeout=timeout_s).json()["items"]
    return {n["name"]: n["status"]["state"] for n in items}
