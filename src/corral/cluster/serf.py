"""The ``serf agent`` each corral host runs as its child: start, health, restart, stop.

Gossip listens on ``bind_addr:bind_port`` (TCP and UDP) and advertises that same address; the
RPC listens on 127.0.0.1 only. The agent's files live in ``data_dir``:

    serf.json      0600; the gossip key (and RPC token): kept out of argv, which any local
                   user can read in /proc
    serf.tags      the tags; written at ``start``, then kept by serf, so tags changed over RPC
                   survive a restart of the child (a new ``SerfAgent`` starts from its own)
    serf.snapshot  members and clocks, so a restarted child rejoins on its own
    serf.log       serf's output

If corral dies (even by SIGKILL) the kernel stops serf too (PR_SET_PDEATHSIG). SIGTERM makes
serf exit *without* leaving, so peers see this host ``failed``; only ``stop(leave=True)`` makes
it ``left``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import os
import random
import secrets
import shutil
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import msgpack  # type: ignore[import-untyped, unused-ignore]

from corral.cluster.child import die_with_parent, wait_until_ready
from corral.cluster.serf_rpc import SerfClient, SerfError

__all__ = ["SerfAgent", "generate_key"]

log = logging.getLogger(__name__)

_PROFILES = ("lan", "wan", "local")
_KEY_SIZES = (16, 24, 32)
_MAX_TAGS_BYTES = 512  # serf's limit on a member's encoded tags (memberlist meta)
_REJOIN_PEERS = 8  # alive peers remembered for rejoining after a restart


def generate_key() -> str:
    """A fresh random gossip key: 32 bytes (AES-256), base64-encoded as serf expects."""
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _validate(
    node: str,
    bind_addr: str,
    ports: Mapping[str, int],
    encrypt_key: str,
    tags: Mapping[str, str],
    profile: str,
) -> None:
    if not node or any(c.isspace() for c in node):
        raise ValueError(f"node: must be a non-empty name without spaces, got {node!r}")
    try:
        ip = ipaddress.ip_address(bind_addr)
    except ValueError:
        raise ValueError(f"bind_addr: must be an IP address, got {bind_addr!r}") from None
    if ip.is_unspecified:
        raise ValueError(f"bind_addr: must be a specific address (peers dial it), got {ip}")
    for name, port in ports.items():
        if not 0 < port < 65536:
            raise ValueError(f"{name}: must be in 1..65535, got {port}")
    try:
        key_len = len(base64.b64decode(encrypt_key, validate=True))
    except (binascii.Error, ValueError):
        key_len = -1
    if key_len not in _KEY_SIZES:
        raise ValueError("encrypt_key: must be base64 of 16, 24 or 32 bytes (see generate_key)")
    bad = [k for k in tags if not k or "=" in k]
    if bad:
        raise ValueError(f"tags: keys must be non-empty and without '=', got {bad!r}")
    if len(cast(bytes, msgpack.packb(dict(tags)))) + 1 > _MAX_TAGS_BYTES:
        raise ValueError(f"tags: must encode to at most {_MAX_TAGS_BYTES} bytes")
    if profile not in _PROFILES:
        raise ValueError(f"profile: must be one of {', '.join(_PROFILES)}, got {profile!r}")


class SerfAgent:
    """Runs one ``serf agent`` and keeps it running until :meth:`stop`.

    ``join`` lists peers (``host`` or ``host:port``) that serf keeps retrying every
    ``retry_join_interval_s`` until one answers, so hosts may start in any order. ``healthy``
    is true only while the agent's RPC answers as this ``node``. When the child dies it is
    restarted with exponential backoff (up to ``max_backoff_s``) unless ``restart`` is false.
    With ``rpc_auth_key`` set, RPC clients must authenticate: use :meth:`connect`. ``tags``
    are the tags it starts with; later changes (``SerfClient.tags``) live in serf and survive
    restarts of the child.

    Raises ``ValueError`` naming the argument when one breaks a rule.
    """

    def __init__(
        self,
        node: str,
        bind_addr: str,
        bind_port: int,
        rpc_port: int,
        data_dir: Path,
        *,
        encrypt_key: str,
        tags: Mapping[str, str],
        join: Sequence[str] = (),
        binary: str = "serf",
        profile: str = "lan",
        rpc_auth_key: str | None = None,
        restart: bool = True,
        max_backoff_s: float = 30.0,
        retry_join_interval_s: float = 5.0,
    ) -> None:
        _validate(
            node,
            bind_addr,
            {"bind_port": bind_port, "rpc_port": rpc_port},
            encrypt_key,
            tags,
            profile,
        )
        self.node = node
        self.bind_addr = bind_addr
        self.bind_port = bind_port
        self.rpc_port = rpc_port
        self.data_dir = data_dir
        self.tags = dict(tags)
        self.join = list(join)
        self.binary = binary
        self.profile = profile
        self.restart = restart
        self.max_backoff_s = max_backoff_s
        self.retry_join_interval_s = retry_join_interval_s
        self.healthy = False
        self.restarts = 0
        self._encrypt_key = encrypt_key
        self._rpc_auth_key = rpc_auth_key
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._watch_task: asyncio.Task[None] | None = None
        self._known_peers: list[str] = []

    @property
    def pid(self) -> int | None:
        """The serf process id while one has been started."""
        return self._proc.pid if self._proc else None

    @property
    def gossip_address(self) -> str:
        """``host:port`` that peers join through."""
        return _host_port(self.bind_addr, self.bind_port)

    @property
    def rpc_address(self) -> str:
        """``127.0.0.1:port`` of the agent's RPC, for :meth:`SerfClient.connect`."""
        return f"127.0.0.1:{self.rpc_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "serf.log"

    async def connect(self, *, timeout_s: float = 10.0) -> SerfClient:
        """A new RPC client of this agent (authenticated when the agent requires it)."""
        return await SerfClient.connect(
            self.rpc_address, auth_key=self._rpc_auth_key, timeout_s=timeout_s
        )

    def _command(self) -> list[str]:
        cmd = [
            shutil.which(self.binary) or self.binary,
            "agent",
            "-node",
            self.node,
            "-bind",
            self.gossip_address,
            "-advertise",
            self.gossip_address,
            "-rpc-addr",
            self.rpc_address,
            "-config-file",
            str(self.data_dir / "serf.json"),
            "-tags-file",
            str(self.data_dir / "serf.tags"),
            "-snapshot",
            str(self.data_dir / "serf.snapshot"),
            "-profile",
            self.profile,
            "-log-level",
            "warn",
        ]
        for peer in self.join:
            cmd += ["-retry-join", peer]
        if self.join:
            cmd += ["-retry-interval", f"{max(1, round(self.retry_join_interval_s))}s"]
        return cmd

    def _write_files(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config: dict[str, str] = {"encrypt_key": self._encrypt_key}
        if self._rpc_auth_key is not None:
            config["rpc_auth"] = self._rpc_auth_key
        path = self.data_dir / "serf.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)  # an older file may have looser bits
            json.dump(config, f)
        (self.data_dir / "serf.tags").write_text(json.dumps(self.tags))

    async def _spawn(self) -> None:
        try:
            with open(self.log_path, "ab") as logf:  # noqa: ASYNC230 - a log file does not block
                self._proc = await asyncio.create_subprocess_exec(
                    *self._command(),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    preexec_fn=die_with_parent,
                    # Its own session: a Ctrl-C meant for corral must not reach serf first.
                    start_new_session=True,
                )
        except OSError as exc:
            raise SerfError(f"cannot start serf ({self.binary}): {exc}") from exc
        log.info("started serf agent %s (pid %s)", self.node, self._proc.pid)

    async def _probe(self) -> bool:
        """True when our agent answers as ``node``; remembers some alive peers on the way."""
        try:
            async with await self.connect(timeout_s=2.0) as client:
                if (await client.stats()).get("agent", {}).get("name") != self.node:
                    return False
                alive = await client.members_filtered(status="alive")
        except SerfError:
            return False
        peers = [m.gossip_addr for m in alive if m.name != self.node]
        if peers:
            self._known_peers = random.sample(peers, min(len(peers), _REJOIN_PEERS))
        return True

    async def _rejoin(self) -> None:
        # The snapshot lags membership by about a second, and peers never notice a quick
        # restart (the new process answers their probes), so a restarted agent could see only
        # itself until the next push-pull (30 s on a LAN). Joining the peers it knew fixes that.
        peers = list(dict.fromkeys([*self._known_peers, *self.join]))
        if not peers:
            return
        try:
            async with await self.connect() as client:
                joined = await client.join(peers)
            log.info("restarted serf agent %s rejoined through %d peers", self.node, joined)
        except SerfError as exc:
            log.warning("restarted serf agent %s could not rejoin: %s", self.node, exc)

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in lines[-3:])

    async def _wait_ready(self, timeout_s: float) -> None:
        await wait_until_ready(
            self._proc,
            self._probe,
            timeout_s,
            poll_s=0.05,
            exited=lambda code: SerfError(
                f"serf exited with code {code} during start: {self._log_tail()} "
                f"(see {self.log_path})"
            ),
            timed_out=lambda: SerfError(
                f"serf RPC did not answer within {timeout_s:.0f}s at {self.rpc_address} "
                f"(see {self.log_path})"
            ),
        )
        self.healthy = True

    async def start(self, timeout_s: float = 15.0) -> None:
        """Start serf and return once its RPC answers; then keep it running in the background.

        Raises :class:`SerfError` (with serf's last log lines) if it cannot be started, exits
        or stays silent; no process is left behind then.
        """
        self._stopping = False
        try:
            self._write_files()
        except OSError as exc:
            raise SerfError(f"cannot prepare {self.data_dir} for serf: {exc}") from exc
        await self._spawn()
        try:
            await self._wait_ready(timeout_s)
        except BaseException:
            await self._terminate(timeout_s=5.0)
            raise
        self._watch_task = asyncio.create_task(self._keep_running(), name="serf-supervisor")

    async def _keep_running(self) -> None:
        backoff = 0.5
        while not self._stopping:
            assert self._proc is not None
            watcher = asyncio.create_task(self._proc.wait())
            while not watcher.done():
                await asyncio.wait({watcher}, timeout=2.0)
                if not watcher.done():
                    self.healthy = await self._probe()
            if self._stopping:
                return
            self.healthy = False
            if not self.restart:
                log.error("serf exited with code %s; not restarting", self._proc.returncode)
                return
            log.error(
                "serf exited with code %s; restarting in %.1fs", self._proc.returncode, backoff
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
            try:
                await self._spawn()
                await self._wait_ready(15.0)
                self.restarts += 1
                await self._rejoin()
                backoff = 0.5
            except SerfError as exc:
                log.error("serf restart failed: %s", exc)

    async def stop(self, *, leave: bool = False, timeout_s: float = 10.0) -> None:
        """Stop serf and wait for it. With ``leave``, first leave the cluster gracefully (peers
        see ``left``; SIGINT, serf's own graceful signal, if the RPC fails); otherwise peers
        will see this host ``failed``. SIGTERM, then SIGKILL after ``timeout_s``. Idempotent.
        """
        self._stopping = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        self.healthy = False
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        if leave:
            try:
                async with await self.connect(timeout_s=timeout_s) as client:
                    await client.leave(timeout_s=timeout_s)
            except SerfError as exc:
                log.warning("serf leave over RPC failed (%s); sending SIGINT", exc)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
                return
            except TimeoutError:
                log.warning("serf did not exit within %.0fs of leaving", timeout_s)
        await self._terminate(timeout_s)

    async def _terminate(self, timeout_s: float) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            log.warning("serf did not stop within %.0fs; killing it", timeout_s)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
