"""ASGI middleware: request ids on every response, and a hard cap on body size."""

from __future__ import annotations

import logging
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.api.rest.errors import bug_response as _bug_response
from corral.api.rest.errors import problem
from corral.model import new_id
from corral.telemetry import REQUEST_ID

__all__ = ["BodyLimitMiddleware", "RequestIdMiddleware"]

log = logging.getLogger(__name__)
_GOOD_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _GOOD_ID.match(given) else new_id()
        token = REQUEST_ID.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"].append((b"x-request-id", rid.encode()))
            await send(message)

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send_with_id(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            # Answer a bug here, inside the request's context, so the 500 carries its id.
            log.exception("unhandled error (a bug in corral)")
            if not started:
                await _bug_response()(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413, whether declared or streamed.

    The body is read here (bounded) before the app sees it, so an oversized chunked upload is
    refused before any of it is parsed.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: str | None = None) -> None:
        """``exempt``: a regular expression of PUT paths that stream (and cap) their own body."""
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = re.compile(exempt) if exempt else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        if (
            self.exempt is not None
            and scope["method"] == "PUT"
            and self.exempt.match(scope.get("path", ""))
        ):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem(
            413,
            "too-large",
            "Request too large",
            f"the body is over {self.max_bytes // 1024} KiB; VM specs are small, check what "
            "you are sending",
        )
        await response(scope, receive, send)
