"""What the etcd and Serf supervisors share: children that die with the agent, and waiting
until a freshly started child answers."""

from __future__ import annotations

import asyncio
import ctypes
import signal
from collections.abc import Awaitable, Callable

__all__ = ["die_with_parent", "wait_until_ready"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the kernel sends the child SIGTERM when the agent dies (even SIGKILL)."""
    # Runs in the child between fork and exec.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


async def wait_until_ready(
    proc: asyncio.subprocess.Process | None,
    probe: Callable[[], Awaitable[bool]],
    timeout_s: float,
    *,
    poll_s: float,
    exited: Callable[[int], Exception],
    timed_out: Callable[[], Exception],
) -> None:
    """Return once ``probe()`` is true; raise ``exited(code)`` if the child ends first, or
    ``timed_out()`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if proc is not None and proc.returncode is not None:
            raise exited(proc.returncode)
        if await probe():
            return
        await asyncio.sleep(poll_s)
    raise timed_out()
