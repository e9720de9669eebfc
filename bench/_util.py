"""Shared bits of the benchmarks: percentiles and a summary line."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
from typing import Any
from urllib.parse import urlsplit

__all__ = ["LeanHttp", "free_port", "summary"]


class LeanHttp:
    """One keep-alive HTTP/1.1 connection for load generators: POST JSON, read the answer.

    Hand-written on purpose: on this 2-core machine httpx's connection pool spent ~1.5 ms
    of CPU per request (py-spy: pool bookkeeping, anyio attribute lookups), so a load
    generator built on it took most of a core from the cluster it measures. This sends
    each request in one write and reads a Content-Length answer (what uvicorn sends);
    nothing else (no chunked bodies, redirects or TLS) is needed here.
    """

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(
        self, path: str, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        data = json.dumps(body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n{extra}\r\n"
        )
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = await asyncio.open_connection(self.host, self.port)
            reader, writer = self._conn
            try:
                writer.write(head.encode() + data)
                status_line = await reader.readuntil(b"\r\n")
                if not status_line:
                    raise ConnectionError("closed")
                length, close = 0, False
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    name, _, value = line.decode("latin-1").partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "connection" and value.strip().lower() == "close":
                        close = True
                payload = await reader.readexactly(length)
            except (ConnectionError, asyncio.IncompleteReadError):
                # The server closed an idle keep-alive connection: open another once.
                await self.close()
                if attempt == 2:
                    raise
                continue
            if close:
                await self.close()
            return int(status_line.split()[1]), payload
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._conn is not None:
            _, writer = self._conn
            self._conn = None
            writer.close()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def summary(label: str, latencies_s: list[float], elapsed_s: float) -> str:
    ms = sorted(x * 1000 for x in latencies_s)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    rate = len(ms) / elapsed_s
    return f"{label:<34} {len(ms):>6} ops  {rate:>8.0f}/s  p50 {q[49]:6.2f} ms  p99 {q[98]:6.2f} ms"
