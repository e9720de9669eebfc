"""The REST API v1 (FastAPI). Handlers parse and render; the service layer decides."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, Header, Path, Query, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from corral import __version__
from corral.api.rest import render
from corral.api.rest.errors import install_error_handlers, problem
from corral.api.rest.middleware import BodyLimitMiddleware, RequestIdMiddleware
from corral.api.rest.migrations import add_migration_routes
from corral.api.rest.placement import add_placement_routes
from corral.api.rest.snapshots import LocalVms, add_snapshot_routes
from corral.api.rest.storage import UPLOAD_PATH, LocalStorage, add_storage_routes
from corral.api.rest.ws import serve_console
from corral.errors import Malformed, NotFound
from corral.model import Task, TokenCreate, Vm, VmCreate
from corral.service.console import ConsoleService, parse_kind
from corral.service.console_tickets import ConsoleKind
from corral.service.context import RequestMeta
from corral.service.groups import GroupService
from corral.service.join import JoinService
from corral.service.migrations import MigrationService
from corral.service.nodes import ClusterService, NodeService
from corral.service.operations import OperationService
from corral.service.placement import PlacementService
from corral.service.snapshots import SnapshotService
from corral.service.storage import ImageService, PoolService, VolumeService
from corral.service.tasks import TaskService
from corral.service.templates import TemplateService
from corral.service.tokens import TokenService
from corral.service.vms import Accepted, VmService
from corral.telemetry import REQUEST_ID

__all__ = ["ApiServices", "create_app"]

MAX_BODY_BYTES = 1024 * 1024
_ETAG = re.compile(r'^(?:W/)?"?(\d+)"?$')

NameParam = Annotated[str, Path(max_length=63, description="a DNS label")]
Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
Cursor = Annotated[str | None, Query(max_length=512, description="from next_cursor")]
Stale = Annotated[bool, Query(description="answer from this server's copy (may lag)")]
Wait = Annotated[bool, Query(description="return when the task has ended")]
Timeout = Annotated[float, Query(gt=0, le=300, description="seconds to wait with wait=true")]
IfMatch = Annotated[str | None, Header(description='"<mod_revision>" from the ETag')]
IdemKey = Annotated[str | None, Header(description="same key and body: same result for 24 h")]


@dataclass
class ApiServices:
    vms: VmService
    tasks: TaskService
    nodes: NodeService
    cluster: ClusterService
    tokens: TokenService
    join: JoinService
    console: ConsoleService
    # Returns the reasons this agent is not ready (empty when ready).
    readiness: Callable[[], Awaitable[list[str]]]
    pools: PoolService
    volumes: VolumeService
    images: ImageService
    # This host's storage operations (servers and the leader call them on a file's host).
    local_storage: LocalStorage | None = None
    snapshots: SnapshotService | None = None
    templates: TemplateService | None = None
    # This host's snapshot and disk-copy operations (servers call them on a VM's host).
    local_vms: LocalVms | None = None
    # Live migration (None: built over the VM service's state).
    migrations: MigrationService | None = None
    # Placement: vm why, dry runs, capacity, groups, drain, rebalance.
    placement: PlacementService | None = None
    groups: GroupService | None = None
    operations: OperationService | None = None


def _meta(if_match: str | None, idempotency_key: str | None) -> RequestMeta:
    revision = None
    if if_match is not None and if_match.strip() != "*":
        m = _ETAG.match(if_match.strip())
        if not m:
            raise Malformed('If-Match: must be an ETag such as "42" (the object\'s mod_revision)')
        revision = int(m.group(1))
    return RequestMeta(
        request_id=REQUEST_ID.get(), if_match=revision, idempotency_key=idempotency_key
    )


def create_app(services: ApiServices) -> FastAPI:
    app = FastAPI(
        title="corral",
        version=__version__,
        description="Cluster manager for virtual machines: REST API v1",
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES, exempt=UPLOAD_PATH)
    app.add_middleware(RequestIdMiddleware)

    async def finish(result: Accepted, wait: bool, timeout: float) -> JSONResponse:
        status = 200 if result.replayed else 202
        task = result.task
        vm = result.vm
        if wait and not task.final:
            task = await services.tasks.wait(task.id, timeout)
        if wait and task.final:
            status = 200
            try:
                vm = await services.vms.get(vm.name)
            except NotFound:
                vm = None  # type: ignore[assignment]
        return render.accepted(vm, task, status)

    async def accepted(vm: Vm, task: Task, wait: bool, timeout: float) -> JSONResponse:
        return await finish(Accepted(vm, task), wait, timeout)

    # Before /vms/{name}/{action}: its /vms/{name}/disks must not be taken for an action.
    add_storage_routes(
        app,
        pools=services.pools,
        volumes=services.volumes,
        images=services.images,
        local_storage=services.local_storage,
        accepted=accepted,
        meta=_meta,
    )
    add_snapshot_routes(
        app,
        snapshots=services.snapshots,
        templates=services.templates,
        tasks=services.tasks,
        vms=services.vms,
        local_vms=services.local_vms,
        meta=_meta,
    )

    migrations = services.migrations or MigrationService(services.vms.ctx, services.placement)
    add_migration_routes(app, migrations, finish, _meta)
    operations = services.operations or OperationService(
        services.vms.ctx, migrations.placement, migrations
    )

    @app.post("/api/v1/tasks/{task_id}/cancel", tags=["tasks"], status_code=202)
    async def cancel_task(task_id: Annotated[str, Path(max_length=64)]) -> JSONResponse:
        """Cancel a task that can stop part-way: a migration rolls back (the guest stays on its
        source); a drain or a rebalance starts no further moves (moves under way finish)."""
        return render.one(await operations.cancel(task_id), 202)

    if services.placement and services.groups and services.operations:
        add_placement_routes(
            app,
            placement=services.placement,
            groups=services.groups,
            operations=services.operations,
        )

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        reasons = await services.readiness()
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

    @app.get("/api/v1/cluster", tags=["cluster"])
    async def cluster() -> dict[str, Any]:
        return await services.cluster.info()

    @app.patch("/api/v1/cluster", tags=["cluster"])
    async def configure_cluster(
        patch: Annotated[dict[str, Any], Body(examples=[{"desired_voters": 3}])],
    ) -> dict[str, Any]:
        await services.cluster.configure(patch)
        return await services.cluster.info()

    @app.post("/api/v1/join", tags=["cluster"])
    async def join(body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        """A new host proves a join token and receives what it needs to take part."""
        return await services.join.join(body)

    @app.post("/api/v1/tokens", tags=["tokens"], status_code=201)
    async def create_token(
        body: Annotated[TokenCreate | None, Body()] = None,
    ) -> JSONResponse:
        issued = await services.tokens.create(body.model_dump() if body is not None else {})
        data = render.obj(issued.token)
        data["secret"] = issued.secret
        return JSONResponse(data, 201, headers={"ETag": f'"{issued.token.mod_revision}"'})

    @app.get("/api/v1/tokens", tags=["tokens"])
    async def list_tokens() -> JSONResponse:
        tokens, revision = await services.tokens.list()
        return render.listing(tokens, None, revision)

    @app.get("/api/v1/tokens/{token_id}", tags=["tokens"])
    async def get_token(token_id: Annotated[str, Path(max_length=16)]) -> JSONResponse:
        return render.one(await services.tokens.get(token_id))

    @app.post("/api/v1/tokens/{token_id}/revoke", tags=["tokens"])
    async def revoke_token(token_id: Annotated[str, Path(max_length=16)]) -> JSONResponse:
        return render.one(await services.tokens.revoke(token_id))

    @app.delete("/api/v1/nodes/{name}", tags=["nodes"])
    async def remove_node(name: NameParam) -> JSONResponse:
        return render.one(await services.nodes.remove(name))

    @app.post("/api/v1/nodes/{name}/leave", tags=["nodes"])
    async def node_leave(name: NameParam) -> JSONResponse:
        return render.one(await services.nodes.leave(name))

    @app.get("/api/v1/nodes", tags=["nodes"])
    async def list_nodes(
        label: Annotated[str | None, Query(max_length=1024, examples=["zone=a"])] = None,
        state: Annotated[str | None, Query(max_length=32)] = None,
        stale: Stale = False,
    ) -> JSONResponse:
        nodes = await services.nodes.list(label=label, state=state, stale=stale)
        return render.listing(nodes.items, None, nodes.revision)

    @app.get("/api/v1/nodes/{name}", tags=["nodes"])
    async def get_node(name: NameParam, stale: Stale = False) -> JSONResponse:
        return render.one(await services.nodes.get(name, stale=stale))

    @app.get("/api/v1/vms", tags=["vms"])
    async def list_vms(
        limit: Limit = 100,
        cursor: Cursor = None,
        label: Annotated[
            str | None, Query(max_length=1024, examples=["tier=web,env!=prod"])
        ] = None,
        node: Annotated[str | None, Query(max_length=63)] = None,
        state: Annotated[str | None, Query(max_length=32)] = None,
        stale: Stale = False,
    ) -> JSONResponse:
        page = await services.vms.list(
            limit=limit, cursor=cursor, label=label, node=node, state=state, stale=stale
        )
        return render.listing(page.items, page.next_cursor, page.revision)

    @app.post("/api/v1/vms", tags=["vms"], status_code=202)
    async def create_vm(
        request: Request,
        body: Annotated[VmCreate, Body()],
        wait: Wait = False,
        timeout: Timeout = 60.0,
        idempotency_key: IdemKey = None,
        dry_run: Annotated[
            bool, Query(description="validate and plan: the host it would go to, and why")
        ] = False,
    ) -> JSONResponse:
        raw = await request.json()
        if dry_run:
            if services.placement is None:
                raise NotFound("dry runs are not served here")
            return JSONResponse(await services.placement.dry_run(raw))
        result = await services.vms.create(raw, _meta(None, idempotency_key), parsed=body)
        return await finish(result, wait, timeout)

    @app.get("/api/v1/vms/{name}", tags=["vms"])
    async def get_vm(name: NameParam, stale: Stale = False) -> JSONResponse:
        return render.one(await services.vms.get(name, stale=stale))

    @app.patch("/api/v1/vms/{name}", tags=["vms"])
    async def patch_vm(
        name: NameParam,
        patch: Annotated[dict[str, Any], Body(examples=[{"labels": {"tier": "db", "old": None}}])],
        if_match: IfMatch = None,
    ) -> JSONResponse:
        return render.one(await services.vms.patch(name, patch, _meta(if_match, None)))

    @app.delete("/api/v1/vms/{name}", tags=["vms"], status_code=202)
    async def delete_vm(
        name: NameParam,
        with_disks: Annotated[bool, Query(description="also delete the vm's volumes")] = False,
        wait: Wait = False,
        timeout: Timeout = 60.0,
        if_match: IfMatch = None,
        idempotency_key: IdemKey = None,
    ) -> JSONResponse:
        result = await services.vms.act(
            name, "delete", None, _meta(if_match, idempotency_key), with_disks=with_disks
        )
        return await finish(result, wait, timeout)

    @app.post("/api/v1/vms/{name}/{action}", tags=["vms"], status_code=202)
    async def vm_action(
        request: Request,
        name: NameParam,
        action: Literal["start", "stop", "reboot", "pause", "resume"],
        wait: Wait = False,
        timeout: Timeout = 60.0,
        if_match: IfMatch = None,
        idempotency_key: IdemKey = None,
    ) -> JSONResponse:
        raw = await request.body()
        body = None
        if raw.strip():
            try:
                body = await request.json()
            except ValueError as exc:
                raise Malformed(f"the body is not valid JSON: {exc}") from None
        meta = _meta(if_match, idempotency_key)
        result = await services.vms.act(name, action, body, meta)
        return await finish(result, wait, timeout)

    @app.get("/api/v1/vms/{name}/console/log", tags=["vms"], response_class=PlainTextResponse)
    async def console_log(
        name: NameParam,
        max_bytes: Annotated[int, Query(alias="bytes", ge=1, le=1024 * 1024)] = 64 * 1024,
        local: Annotated[bool, Query(description="read on this host only (hosts use it)")] = False,
    ) -> Response:
        """The last bytes the guest printed on its serial console."""
        data = await services.console.tail(name, max_bytes, local_only=local)
        return Response(data, media_type="text/plain; charset=utf-8")

    @app.post("/api/v1/vms/{name}/console/ticket", tags=["vms"])
    async def console_ticket(
        name: NameParam,
        body: Annotated[
            dict[str, Any] | None, Body(examples=[{"console": "serial"}, {"console": "vnc"}])
        ] = None,
    ) -> JSONResponse:
        """A ticket (valid 60 s, single use) to open the VM's serial or VNC console WebSocket:
        connect to ``path`` (it carries the ticket) with ws:// on any host's API."""
        return JSONResponse(await services.console.ticket(name, parse_kind(body)))

    async def console_ws(websocket: WebSocket, name: str, kind: ConsoleKind) -> None:
        params = websocket.query_params
        await serve_console(
            websocket,
            lambda: services.console.open(
                name, kind, params.get("ticket"), local_only=params.get("local") == "true"
            ),
        )

    @app.websocket("/api/v1/vms/{name}/console")
    async def serial_console(websocket: WebSocket, name: str) -> None:
        """The VM's serial console, both ways, as binary messages (``?ticket=`` required)."""
        await console_ws(websocket, name, "serial")

    @app.websocket("/api/v1/vms/{name}/vnc")
    async def vnc_console(websocket: WebSocket, name: str) -> None:
        """The VM's VNC server (RFB over binary messages, for noVNC; ``?ticket=`` required)."""
        await console_ws(websocket, name, "vnc")

    @app.get("/api/v1/tasks", tags=["tasks"])
    async def list_tasks(
        limit: Limit = 100,
        cursor: Cursor = None,
        state: Annotated[
            Literal["pending", "running", "succeeded", "failed", "cancelled"] | None, Query()
        ] = None,
        target: Annotated[str | None, Query(max_length=128, examples=["vm/web-1"])] = None,
        stale: Stale = False,
    ) -> JSONResponse:
        page = await services.tasks.list(
            limit=limit, cursor=cursor, state=state, target=target, stale=stale
        )
        return render.listing(page.items, page.next_cursor, page.revision)

    @app.get("/api/v1/tasks/{task_id}", tags=["tasks"])
    async def get_task(
        task_id: Annotated[str, Path(max_length=64)],
        wait: Wait = False,
        timeout: Timeout = 60.0,
    ) -> JSONResponse:
        if wait:
            return render.one(await services.tasks.wait(task_id, timeout))
        return render.one(await services.tasks.get(task_id))

    return app
