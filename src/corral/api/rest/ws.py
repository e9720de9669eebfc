"""Serving an interactive console over a WebSocket: accept, open the channel, pump bytes.

The WebSocket is accepted first, so a console that cannot open is refused with a close code and
a reason a browser can read too (an HTTP refusal of the upgrade is invisible to JavaScript):
1008 for a bad ticket (get a new one), 4404 no such VM, 4409 no such console now (stopped, fake
driver), 4503 the VM's host did not answer, 1011 a bug (see ``corral.service.console``). Bytes go
both ways as binary messages (text messages from the client are sent on as UTF-8). When the
console ends (the VM stopped) the WebSocket is closed with the channel's code and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from fastapi import WebSocket
from starlette.websockets import WebSocketState

from corral.errors import CorralError
from corral.service.console import CLOSE_CODES, ConsoleChannel, close_code_for

__all__ = ["close_reason", "serve_console"]

log = logging.getLogger(__name__)
_MAX_REASON_BYTES = 123  # RFC 6455: a close frame's reason fits in 125 bytes with its code


def close_reason(text: str) -> str:
    """``text`` cut to what a WebSocket close frame can carry (whole UTF-8 characters)."""
    data = text.encode()
    if len(data) <= _MAX_REASON_BYTES:
        return text
    return data[: _MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(Exception):  # the client may be gone already
            await websocket.close(code=code, reason=close_reason(reason))


async def serve_console(
    websocket: WebSocket, open_channel: Callable[[], Awaitable[ConsoleChannel]]
) -> None:
    """Accept ``websocket``, open the console and pump bytes until either side ends."""
    offered = websocket.scope.get("subprotocols") or []
    # noVNC (and other websockify clients) may ask for the "binary" subprotocol.
    await websocket.accept(subprotocol="binary" if "binary" in offered else None)
    try:
        channel = await open_channel()
    except CorralError as exc:
        await _close(websocket, close_code_for(exc), exc.detail)
        return
    except Exception:
        log.exception("opening a console failed (a bug in corral)")
        await _close(
            websocket, CLOSE_CODES["internal"], "a bug in corral; the agent's log has details"
        )
        return
    try:
        await _pump(websocket, channel)
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def _pump(websocket: WebSocket, channel: ConsoleChannel) -> None:
    async def to_client() -> None:
        while (data := await channel.recv()) is not None:
            await websocket.send_bytes(data)

    async def from_client() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes") or (message.get("text") or "").encode()
            if data:
                await channel.send(data)

    out = asyncio.create_task(to_client(), name="console-out")
    into = asyncio.create_task(from_client(), name="console-in")
    try:
        done, _ = await asyncio.wait({out, into}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (out, into):
            task.cancel()
        for task in (out, into):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if out in done and not out.cancelled() and out.exception() is None:
        # The console ended (the VM stopped, or the VM's host closed it): say why.
        await _close(websocket, channel.close_code, channel.close_reason)
    else:
        await _close(websocket, 1000, "")
