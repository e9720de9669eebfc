"""What a host remembers about its cluster (``<data-dir>/cluster.json``, mode 0600), and the
join handshake that first fills it in."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

__all__ = ["ClusterIdentity", "JoinRefused", "request_join"]

FILE = "cluster.json"
log = logging.getLogger(__name__)


class JoinRefused(RuntimeError):
    """The join did not happen; the message says why and what to do."""


@dataclass
class ClusterIdentity:
    cluster_id: str
    role: str  # "server" | "compute"
    gossip_key: str
    servers: list[dict[str, str]] = field(default_factory=list)
    gossip_peers: list[str] = field(default_factory=list)
    # Set on a server that joined: the etcd member list to start its member with, once.
    etcd_initial_cluster: str = ""

    @classmethod
    def load(cls, data_dir: Path) -> ClusterIdentity | None:
        path = data_dir / FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise JoinRefused(f"{path} is unreadable ({exc}); restore it or rejoin") from exc
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})

    def save(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @property
    def server_api_urls(self) -> list[str]:
        return [s["api_url"] for s in self.servers if s.get("api_url")]

    @property
    def server_grpc_urls(self) -> list[str]:
        return [s["grpc_url"] for s in self.servers if s.get("grpc_url")]

    @property
    def etcd_client_urls(self) -> list[str]:
        return [s["etcd_client_url"] for s in self.servers if s.get("etcd_client_url")]


def _api_base(addr: str) -> str:
    addr = addr.strip().rstrip("/")
    if "://" not in addr:
        addr = "http://" + addr
    host_part = addr.split("://", 1)[1]
    if ":" not in host_part.rsplit("]", 1)[-1]:
        addr += ":8700"
    return addr


def _detail(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("detail", resp.text))
    except ValueError:
        return resp.text


async def request_join(
    addr: str, body: dict[str, Any], *, retry_for_s: float = 180.0
) -> dict[str, Any]:
    """POST /api/v1/join on ``addr``; JoinRefused with the server's reason on any failure."""
    url = _api_base(addr) + "/api/v1/join"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for_s
    while True:
        try:
            async with httpx.AsyncClient(timeout=30.0) as client:
                resp = await client.post(url, json=body)
        except httpx.HTTPError as exc:
            raise JoinRefused(
                f"cannot reach {url}: {exc}; check --join (any host of the cluster, e.g. "
                "10.0.0.1 or 10.0.0.1:8700)"
            ) from exc
        # 503: the cluster cannot take this host right now (e.g. another server is catching
        # up); it says when to come back.
        if resp.status_code != 503 or loop.time() >= deadline:
            break
        wait = float(resp.headers.get("retry-after", "5"))
        log.info("join deferred by the cluster (%s); retrying in %.0fs", _detail(resp), wait)
        await asyncio.sleep(wait)
    if resp.status_code != 200:
        raise JoinRefused(f"the cluster refused the join ({resp.status_code}): {_detail(resp)}")
    data: dict[str, Any] = resp.json()
    return data
