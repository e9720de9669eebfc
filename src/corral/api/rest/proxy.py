"""The REST API of a compute-only host: it keeps no state, so it forwards every API call to a
server (failing over between them) and answers only its own health itself. ``--join`` and
``CORRAL_ADDR`` therefore work with the address of any host.

It also serves the consoles of the VMs it runs when a server forwards them here
(``local=true``: the console log, and the serial and VNC WebSockets after checking their
ticket); a console WebSocket opened here without ``local=true`` goes to a server, which
finds the VM's host."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from urllib.parse import urlencode

import httpx
from fastapi import Body, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response

from corral import __version__
from corral.api.rest.errors import install_error_handlers, problem
from corral.api.rest.middleware import BodyLimitMiddleware, RequestIdMiddleware
from corral.api.rest.storage import UPLOAD_PATH
from corral.api.rest.ws import serve_console
from corral.errors import Unavailable
from corral.service.console import (
    ConsoleChannel,
    OpenLocalConsole,
    RemoteChannel,
    console_path,
    ws_base,
)
from corral.service.console_tickets import ConsoleKind, ConsoleTickets
from corral.telemetry import REQUEST_ID

__all__ = ["create_proxy_app"]

_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


def create_proxy_app(
    upstreams: Callable[[], list[str]],
    readiness: Callable[[], Awaitable[list[str]]],
    local_console: Callable[[str, int], Awaitable[bytes | None]],
    *,
    local_storage: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
    local_vms: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
    max_body_bytes: int = 1024 * 1024,
    tickets: ConsoleTickets | None = None,
    open_local: OpenLocalConsole | None = None,
) -> FastAPI:
    app = FastAPI(
        title="corral (compute host)",
        version=__version__,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, exempt=UPLOAD_PATH)
    app.add_middleware(RequestIdMiddleware)
    client = httpx.AsyncClient(timeout=330.0)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        reasons = await readiness()
        if reasons:
            return problem(
                503,
                "unavailable",
                "Not ready",
                "; ".join(reasons),
                headers={"Retry-After": "2"},
                extra={"reasons": reasons},
            )
        return JSONResponse({"status": "ready"})

    @app.get("/api/v1/vms/{name}/console/log")
    async def console_log(request: Request, name: str) -> Response:
        # A server asks the host that runs the VM (this one) with local=true.
        if request.query_params.get("local") != "true":
            return await forward(request, f"v1/vms/{name}/console/log")
        try:
            max_bytes = min(max(int(request.query_params.get("bytes", "65536")), 1), 1 << 20)
        except ValueError:
            return problem(422, "validation", "Invalid request", "bytes: must be an integer")
        data = await local_console(name, max_bytes)
        if data is None:
            return problem(404, "not-found", "Not found", f"vm {name!r} has no console here")
        return Response(data, media_type="text/plain; charset=utf-8")

    @app.post("/api/v1/local/storage", include_in_schema=False)
    async def host_storage(op: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        if local_storage is None:
            raise Unavailable("this host runs no node agent storage")
        return await local_storage(op)

    @app.post("/api/v1/local/vms", include_in_schema=False)
    async def host_vms(op: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        if local_vms is None:
            raise Unavailable("this host runs no hypervisor")
        return await local_vms(op)

    @app.put("/api/v1/images/{name}/files/{file}")
    async def refuse_upload(name: str, file: str) -> Response:
        return problem(
            409,
            "conflict",
            "Upload to a server",
            "image files are kept by servers: point the CLI at a server host (--addr or "
            "CORRAL_ADDR) to upload them",
        )

    async def open_console(
        name: str, kind: ConsoleKind, ticket: str | None, local: bool
    ) -> ConsoleChannel:
        if tickets is None or open_local is None:
            raise Unavailable("this host cannot check console tickets yet; retry")
        if local:
            claims = tickets.verify(ticket, name, kind, consume=True)
            return await open_local(name, claims.vm_id, kind)
        claims = tickets.verify(ticket, name, kind, consume=False)
        tried = []
        for base in upstreams():
            url = f"{ws_base(base)}{console_path(name, kind)}?{urlencode({'ticket': claims.token})}"
            try:
                return await RemoteChannel.open(url, f"server {base}")
            except Unavailable as exc:
                tried.append(exc.detail)
        raise Unavailable(
            "this compute host could not reach any server: " + ("; ".join(tried) or "none known")
        )

    async def console_ws(websocket: WebSocket, name: str, kind: ConsoleKind) -> None:
        params = websocket.query_params
        await serve_console(
            websocket,
            lambda: open_console(name, kind, params.get("ticket"), params.get("local") == "true"),
        )

    @app.websocket("/api/v1/vms/{name}/console")
    async def serial_console(websocket: WebSocket, name: str) -> None:
        await console_ws(websocket, name, "serial")

    @app.websocket("/api/v1/vms/{name}/vnc")
    async def vnc_console(websocket: WebSocket, name: str) -> None:
        await console_ws(websocket, name, "vnc")

    @app.api_route("/api/{path:path}", methods=["GET", "POST", "PATCH", "PUT", "DELETE"])
    async def forward(request: Request, path: str) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        headers["x-request-id"] = REQUEST_ID.get()
        tried = []
        for base in upstreams():
            url = f"{base.rstrip('/')}/api/{path}"
            try:
                resp = await client.request(
                    request.method,
                    url,
                    params=request.query_params,
                    content=body,
                    headers=headers,
                )
            except httpx.TransportError as exc:
                tried.append(f"{base} ({type(exc).__name__})")
                continue
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS}
            out.pop("content-encoding", None)
            out.pop("x-request-id", None)
            return Response(resp.content, resp.status_code, headers=out)
        return problem(
            503,
            "unavailable",
            "Service unavailable",
            "this compute host could not reach any server: " + (", ".join(tried) or "none known"),
            headers={"Retry-After": "2"},
        )

    return app
