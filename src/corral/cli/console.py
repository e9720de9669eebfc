"""`corral vm console`: a VM's serial console in the terminal, over the API's WebSocket.

In a terminal, stdin is put in raw mode (every key goes to the guest, Ctrl-C included) and
Ctrl-] leaves; the terminal is restored however the session ends. When stdin is not a terminal
(a pipe or a file) the console is scriptable: stdin is sent as it comes, output is printed, and
the session ends `linger` seconds after stdin ends. `timeout` ends any session after that long.

The server closes the WebSocket with a code saying why (see `corral.service.console`); it is
turned into the CLI's exit codes: 0 left or the console ended normally, 1 refused ticket or a
bug, 3 no such VM, 4 no such console now (stopped, fake driver), 5 unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
import termios
import tty
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

__all__ = ["ESCAPE", "ConsoleEnd", "run_console"]

ESCAPE = 0x1D  # Ctrl-]
_READ = 4096

# WebSocket close code -> (exit code, what to tell the user before the server's reason)
_EXITS: dict[int, tuple[int, str]] = {
    1000: (0, "console closed"),
    1001: (0, "console closed"),
    1008: (1, "console refused"),
    1011: (1, "console failed"),
    1013: (1, "console dropped"),
    4404: (3, "not found"),
    4409: (4, "console unavailable"),
    4503: (5, "unavailable"),
}


@dataclass(frozen=True)
class ConsoleEnd:
    """How a session ended: the CLI exit code and a line for stderr ("" for none)."""

    exit_code: int
    message: str


def _from_close(exc: ConnectionClosed) -> ConsoleEnd:
    frame = exc.rcvd
    if frame is None:
        return ConsoleEnd(5, "lost the connection to the console (the server went away)")
    code, what = _EXITS.get(frame.code, (1, f"console closed ({frame.code})"))
    reason = f": {frame.reason}" if frame.reason else ""
    return ConsoleEnd(code, f"{what}{reason}")


class _Stdin:
    """Chunks of stdin without blocking the event loop; b"" at end of input."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        # epoll cannot watch regular files (`< file`) nor /dev/null; they never block, so
        # they are read directly.
        self.selectable = not stat.S_ISREG(os.fstat(fd).st_mode)
        if self.selectable:
            try:
                self._loop.add_reader(fd, self._readable)
            except PermissionError:
                self.selectable = False
            else:
                os.set_blocking(fd, False)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, _READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self.fd)
        self.queue.put_nowait(data)

    async def read(self) -> bytes:
        if self.selectable:
            return await self.queue.get()
        return os.read(self.fd, _READ)

    def close(self) -> None:
        if self.selectable:
            self._loop.remove_reader(self.fd)
            with contextlib.suppress(OSError):
                os.set_blocking(self.fd, True)


async def _session(
    ws: ClientConnection,
    stdin: _Stdin,
    out: BinaryIO,
    *,
    interactive: bool,
    linger: float,
) -> ConsoleEnd:
    async def printer() -> ConsoleEnd:
        try:
            while True:
                message = await ws.recv()
                out.write(message.encode() if isinstance(message, str) else message)
                out.flush()
        except ConnectionClosed as exc:
            return _from_close(exc)

    async def typist() -> ConsoleEnd:
        while data := await stdin.read():
            if interactive and ESCAPE in data:
                if head := data[: data.index(ESCAPE)]:
                    await ws.send(head)
                return ConsoleEnd(0, "")
            await ws.send(data)
        # End of input (pipe mode): keep printing what the guest answers for a while.
        await asyncio.sleep(linger)
        return ConsoleEnd(0, "")

    tasks = [asyncio.create_task(printer()), asyncio.create_task(typist())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = next(iter(done))
        try:
            return first.result()
        except ConnectionClosed as exc:  # sending after the server closed
            return _from_close(exc)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _run(
    url: str,
    stdin_fd: int,
    out: BinaryIO,
    *,
    interactive: bool,
    linger: float,
    timeout: float | None,
    hello: Callable[[], None],
) -> ConsoleEnd:
    try:
        ws = await connect(url, open_timeout=10.0, max_size=None, compression=None)
    except InvalidStatus as exc:
        return ConsoleEnd(5, f"the server refused the console ({exc.response.status_code})")
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
        return ConsoleEnd(5, f"cannot open the console at {url.split('?')[0]}: {exc}")
    hello()
    stdin = _Stdin(stdin_fd)
    try:
        async with asyncio.timeout(timeout):
            return await _session(ws, stdin, out, interactive=interactive, linger=linger)
    except TimeoutError:
        return ConsoleEnd(0, f"left after --timeout {timeout:g}s")
    finally:
        stdin.close()
        with contextlib.suppress(Exception):
            await ws.close()


def run_console(
    url: str,
    *,
    name: str,
    linger: float = 2.0,
    timeout: float | None = None,
    stdin_fd: int | None = None,
    out: BinaryIO | None = None,
    err: Callable[[str], None] | None = None,
) -> ConsoleEnd:
    """Run one console session on ``url`` (a ticketed WebSocket URL) and say how it ended.

    A terminal on stdin is put in raw mode (restored on the way out) and Ctrl-] leaves;
    otherwise stdin is sent until it ends and output is printed for ``linger`` more seconds.
    """
    fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    out = out if out is not None else sys.stdout.buffer
    say = err if err is not None else (lambda line: print(line, file=sys.stderr, flush=True))
    interactive = os.isatty(fd)
    saved = termios.tcgetattr(fd) if interactive else None

    def hello() -> None:
        if interactive:
            say(f"connected to vm {name}'s serial console; Ctrl-] leaves")
            tty.setraw(fd)

    try:
        end = asyncio.run(
            _run(
                url,
                fd,
                out,
                interactive=interactive,
                linger=linger,
                timeout=timeout,
                hello=hello,
            )
        )
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    if interactive:
        # The guest's last line may have left the cursor mid-line.
        say("")
    if end.message:
        say(end.message)
    return end
