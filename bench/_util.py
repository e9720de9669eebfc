"""Shared bits of the benchmarks: percentiles and a summary line."""

from __future__ import annotations

import socket
import statistics

__all__ = ["free_port", "summary"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def summary(label: str, latencies_s: list[float], elapsed_s: float) -> str:
    ms = sorted(x * 1000 for x in latencies_s)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    rate = len(ms) / elapsed_s
    return f"{label:<34} {len(ms):>6} ops  {rate:>8.0f}/s  p50 {q[49]:6.2f} ms  p99 {q[98]:6.2f} ms"
