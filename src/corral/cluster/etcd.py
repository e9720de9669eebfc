"""The etcd member a server agent runs as its child: start, health, restart with backoff, stop.

The user never runs etcd by hand. The member's data lives in ``<data_dir>/etcd``; it listens on
the agent's bind address only. If the agent dies (even by SIGKILL) the kernel stops etcd too
(PR_SET_PDEATHSIG), so a restarted agent never finds an orphan holding its ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx

from corral.cluster.child import die_with_parent, wait_until_ready

__all__ = ["EtcdConfig", "EtcdSupervisor", "EtcdTlsFiles"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EtcdTlsFiles:
    """The member's TLS files: the etcd CA, and its certificate and key (PEM).

    The one certificate serves the client and peer listeners and is its client certificate
    toward the other members; both listeners require a certificate of the same CA."""

    ca: Path
    cert: Path
    key: Path

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the etcd CA and presents this member's certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


@dataclass(frozen=True)
class EtcdConfig:
    name: str
    data_dir: Path
    bind: str
    client_port: int
    peer_port: int
    binary: str = "etcd"
    # Set when this member joins an existing cluster: "n1=http://..,n2=http://.." with itself.
    initial_cluster: str = ""
    # TLS on both listeners with client certificate authentication; None: plaintext.
    tls: EtcdTlsFiles | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.bind}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.bind}:{self.peer_port}"

    @property
    def member_dir(self) -> Path:
        return self.data_dir / "etcd"


def _last_error(log_path: Path) -> str:
    """The last error etcd logged (its JSON ``msg`` and ``error``), else its last line."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()[-50:]
    except OSError:
        return "no log"
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal", "panic"):
            return f"{entry.get('msg', '')}: {entry.get('error', '')}".strip(": ")
    return lines[-1][:300] if lines else "empty log"


class EtcdSupervisor:
    """Runs one etcd member and keeps it running until ``stop``.

    ``healthy`` is true only while etcd answers its /health endpoint; the agent's readiness
    follows it.
    """

    def __init__(self, config: EtcdConfig, *, max_backoff_s: float = 30.0) -> None:
        self.config = config
        self.max_backoff_s = max_backoff_s
        self.healthy = False
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._watch_task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _command(self) -> list[str]:
        c = self.config
        binary = shutil.which(c.binary) or c.binary
        cmd = [
            binary,
            "--name",
            c.name,
            "--data-dir",
            str(c.member_dir),
            "--listen-client-urls",
            c.client_url,
            "--advertise-client-urls",
            c.client_url,
            "--listen-peer-urls",
            c.peer_url,
            "--initial-advertise-peer-urls",
            c.peer_url,
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "1h",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        if c.tls is not None:
            files = [str(c.tls.cert), str(c.tls.key), str(c.tls.ca)]
            cmd += [
                *("--cert-file", files[0], "--key-file", files[1]),
                *("--client-cert-auth", "--trusted-ca-file", files[2]),
                *("--peer-cert-file", files[0], "--peer-key-file", files[1]),
                *("--peer-client-cert-auth", "--peer-trusted-ca-file", files[2]),
            ]
        if (c.member_dir / "member").exists():
            return cmd  # the member's own data says which cluster it belongs to
        if c.initial_cluster:
            # Joining: the leader already added this member (as a learner).
            return [
                *cmd,
                "--initial-cluster",
                c.initial_cluster,
                "--initial-cluster-state",
                "existing",
            ]
        return [
            *cmd,
            "--initial-cluster",
            f"{c.name}={c.peer_url}",
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            f"corral-{c.name}",
        ]

    async def _spawn(self) -> None:
        self.config.member_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.config.member_dir, 0o700)
        log_path = self.config.data_dir / "etcd.log"
        with open(log_path, "ab") as logf:  # noqa: ASYNC230 - opening a log file does not block
            self._proc = await asyncio.create_subprocess_exec(
                *self._command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                preexec_fn=die_with_parent,
                # Its own session: a Ctrl-C meant for the agent must not stop etcd first.
                start_new_session=True,
            )
        log.info("started etcd member %s (pid %s)", self.config.name, self._proc.pid)

    async def _probe(self) -> bool:
        if self._http is None:
            tls = self.config.tls
            self._http = httpx.AsyncClient(
                timeout=2.0, verify=tls.ssl_context() if tls is not None else True
            )
        try:
            resp = await self._http.get(self.config.client_url + "/health")
            return resp.status_code == 200 and resp.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    async def _wait_healthy(self, timeout_s: float) -> None:
        log_path = self.config.data_dir / "etcd.log"
        await wait_until_ready(
            self._proc,
            self._probe,
            timeout_s,
            poll_s=0.1,
            exited=lambda code: RuntimeError(
                f"etcd exited with code {code} during start: {_last_error(log_path)} "
                f"(whole log: {log_path})"
            ),
            timed_out=lambda: RuntimeError(
                f"etcd did not become healthy within {timeout_s:.0f}s at "
                f"{self.config.client_url}; see {log_path}"
            ),
        )
        self.healthy = True

    async def start(self, timeout_s: float = 30.0) -> None:
        """Start etcd and return once it is healthy; then keep it running in the background."""
        await self._spawn()
        await self._wait_healthy(timeout_s)
        self._watch_task = asyncio.create_task(self._keep_running(), name="etcd-supervisor")

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
            log.error(
                "etcd exited with code %s; restarting in %.1fs", self._proc.returncode, backoff
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
            try:
                await self._spawn()
                await self._wait_healthy(30.0)
                self.restarts += 1
                backoff = 0.5
            except (RuntimeError, OSError) as exc:
                log.error("etcd restart failed: %s", exc)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM etcd and wait; SIGKILL after ``timeout_s``."""
        self._stopping = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        proc = self._proc
        self.healthy = False
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            log.warning("etcd did not stop within %.0fs; killing it", timeout_s)
            proc.kill()
            await proc.wait()
