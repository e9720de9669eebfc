"""The test guest's serial console as a user sees it: the log for output, the socket for input.

The guest (guest/init) prints ``corral-guest: booted``, then ``corral-heartbeat N`` every second,
and answers one command per line. Offsets (``mark()``) let a test look only at what was printed
after a given moment, e.g. after a reboot.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["BOOTED", "GuestConsole"]

BOOTED = "corral-guest: booted"
_HEARTBEAT = re.compile(r"^corral-heartbeat (\d+)$")
_ANSWERS = re.compile(r"^(pattern ok|pattern mismatch|pattern written|corral-guest: error:.*)$")


class GuestConsole:
    def __init__(self, log: Path, socket: Path) -> None:
        self.log = log
        self.socket = socket

    def mark(self) -> int:
        """The current end of the console log: pass it as ``since`` to ignore older output."""
        try:
            return self.log.stat().st_size
        except FileNotFoundError:
            return 0

    def lines(self, since: int = 0) -> list[str]:
        """Complete lines printed after offset ``since``, without the tty's carriage returns."""
        try:
            data = self.log.read_bytes()[since:]
        except FileNotFoundError:
            return []
        text = data.decode(errors="replace").replace("\r", "")
        return text.split("\n")[:-1]  # the last piece is an unfinished line (or empty)

    def heartbeats(self, since: int = 0) -> list[int]:
        return [int(m.group(1)) for line in self.lines(since) if (m := _HEARTBEAT.match(line))]

    async def wait_for(
        self, wanted: Callable[[list[str]], bool], *, since: int = 0, timeout_s: float = 30.0
    ) -> list[str]:
        """Poll the log until ``wanted(lines)``; fails the test with the log's tail if not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            lines = self.lines(since)
            if wanted(lines):
                return lines
            if loop.time() >= deadline:
                tail = "\n".join(lines[-15:])
                raise AssertionError(f"console {self.log} after {timeout_s} s:\n{tail}")
            await asyncio.sleep(0.1)

    async def wait_booted(self, *, since: int = 0, timeout_s: float = 60.0) -> None:
        await self.wait_for(lambda lines: BOOTED in lines, since=since, timeout_s=timeout_s)

    async def wait_heartbeat(
        self, at_least: int, *, since: int = 0, timeout_s: float = 60.0
    ) -> list[int]:
        """Heartbeat numbers printed after ``since`` once one of them is >= ``at_least``."""
        await self.wait_for(
            lambda lines: any(
                int(m.group(1)) >= at_least for line in lines if (m := _HEARTBEAT.match(line))
            ),
            since=since,
            timeout_s=timeout_s,
        )
        return self.heartbeats(since)

    async def type(self, line: str, *, timeout_s: float = 30.0) -> None:
        """Type ``line`` and leave without waiting for an answer, once QEMU took every byte.

        QEMU's socket chardev feeds the UART a few bytes at a time; a client that closes right
        after writing loses whatever QEMU had not read yet (the hang-up drops it). So the
        connection is half-closed (QEMU still reads, then sees end-of-file and closes its side)
        and this returns when QEMU closed it: the guest has the whole line.
        """
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            writer.write_eof()
            async with asyncio.timeout(timeout_s):
                while await reader.read(4096):
                    pass
        finally:
            writer.close()
            await writer.wait_closed()

    async def command(
        self, line: str, *, expect: str | None = None, timeout_s: float = 30.0
    ) -> str:
        """Type ``line`` on the console; return the guest's answer: the first line equal to
        ``expect`` if given, else the first pattern/error answer."""
        since = self.mark()
        _, writer = await asyncio.open_unix_connection(str(self.socket))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()

            def answered(lines: list[str]) -> bool:
                if expect is not None:
                    return expect in lines
                return any(_ANSWERS.match(x) for x in lines)

            lines = await self.wait_for(answered, since=since, timeout_s=timeout_s)
        finally:
            writer.close()
            await writer.wait_closed()
        if expect is not None:
            return expect
        return next(x for x in lines if _ANSWERS.match(x))
