"""REST routes of snapshots, clones and templates, and the host-local VM operations endpoint.

Every write answers ``202 {"object": ..., "task": ...}`` (``?wait=true`` waits for the task).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Body, FastAPI, Path, Query
from fastapi.responses import JSONResponse

from corral.api.rest import render
from corral.errors import Unavailable
from corral.model import Task
from corral.model.common import ObjectMeta
from corral.service.context import RequestMeta
from corral.service.snapshots import SnapshotService
from corral.service.tasks import TaskService
from corral.service.templates import TemplateService
from corral.service.vms import Accepted, VmService

__all__ = ["LocalVms", "add_snapshot_routes"]

NameParam = Annotated[str, Path(max_length=63, description="a DNS label")]
Wait = Annotated[bool, Query(description="return when the task has ended")]
Timeout = Annotated[float, Query(gt=0, le=900, description="seconds to wait with wait=true")]
LocalVms = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def add_snapshot_routes(
    app: FastAPI,
    *,
    snapshots: SnapshotService | None,
    templates: TemplateService | None,
    tasks: TaskService,
    vms: VmService,
    local_vms: LocalVms | None,
    meta: Callable[[str | None, str | None], RequestMeta],
) -> None:
    """Register the routes (before the generic ``/vms/{name}/{action}`` route)."""

    def need_snapshots() -> SnapshotService:
        if snapshots is None:
            raise Unavailable("this server does not serve snapshots")
        return snapshots

    def need_templates() -> TemplateService:
        if templates is None:
            raise Unavailable("this server does not serve templates")
        return templates

    async def accepted(
        obj: ObjectMeta | None, task: Task, wait: bool, timeout: float
    ) -> JSONResponse:
        status = 202
        if wait and not task.final:
            task = await tasks.wait(task.id, timeout)
        if task.final:
            status = 200
        body = {"object": render.obj(obj) if obj is not None else None, "task": render.obj(task)}
        return JSONResponse(body, status, headers={"Location": f"/api/v1/tasks/{task.id}"})

    async def vm_accepted(result: Accepted, wait: bool, timeout: float) -> JSONResponse:
        task = result.task
        if wait and not task.final:
            task = await tasks.wait(task.id, timeout)
        vm = await vms.get(result.vm.name) if wait else result.vm
        return await accepted(vm, task, False, timeout)

    # -- snapshots ------------------------------------------------------------------------------

    @app.get("/api/v1/vms/{name}/snapshots", tags=["snapshots"])
    async def list_snapshots(name: NameParam) -> JSONResponse:
        items, revision = await need_snapshots().list(name)
        return render.listing(items, None, revision)

    @app.post("/api/v1/vms/{name}/snapshots", tags=["snapshots"], status_code=202)
    async def create_snapshot(
        name: NameParam,
        body: Annotated[
            dict[str, Any], Body(examples=[{"name": "before-upgrade", "memory": True}])
        ],
        wait: Wait = False,
        timeout: Timeout = 300.0,
    ) -> JSONResponse:
        result = await need_snapshots().create(name, body, meta(None, None))
        return await accepted(result.snapshot, result.task, wait, timeout)

    @app.get("/api/v1/vms/{name}/snapshots/{snapshot}", tags=["snapshots"])
    async def get_snapshot(name: NameParam, snapshot: NameParam) -> JSONResponse:
        return render.one(await need_snapshots().get(name, snapshot))

    @app.post("/api/v1/vms/{name}/snapshots/{snapshot}/rollback", tags=["snapshots"])
    async def rollback_snapshot(
        name: NameParam, snapshot: NameParam, wait: Wait = False, timeout: Timeout = 300.0
    ) -> JSONResponse:
        result = await need_snapshots().rollback(name, snapshot, meta(None, None))
        return await accepted(result.snapshot, result.task, wait, timeout)

    @app.delete("/api/v1/vms/{name}/snapshots/{snapshot}", tags=["snapshots"])
    async def delete_snapshot(
        name: NameParam, snapshot: NameParam, wait: Wait = False, timeout: Timeout = 300.0
    ) -> JSONResponse:
        result = await need_snapshots().delete(name, snapshot, meta(None, None))
        return await accepted(result.snapshot, result.task, wait, timeout)

    # -- clones and templates -------------------------------------------------------------------

    @app.post("/api/v1/vms/{name}/clone", tags=["vms"], status_code=202)
    async def clone_vm(
        name: NameParam,
        body: Annotated[dict[str, Any], Body(examples=[{"name": "web-2", "start": True}])],
        wait: Wait = False,
        timeout: Timeout = 300.0,
    ) -> JSONResponse:
        result = await need_templates().clone(name, body, meta(None, None))
        return await vm_accepted(result, wait, timeout)

    @app.get("/api/v1/templates", tags=["templates"])
    async def list_templates() -> JSONResponse:
        items, revision = await need_templates().list()
        return render.listing(items, None, revision)

    @app.post("/api/v1/templates", tags=["templates"], status_code=201)
    async def create_template(
        body: Annotated[dict[str, Any], Body(examples=[{"name": "base", "vm": "web-1"}])],
    ) -> JSONResponse:
        return render.one(await need_templates().create(body, meta(None, None)), 201)

    @app.get("/api/v1/templates/{name}", tags=["templates"])
    async def get_template(name: NameParam) -> JSONResponse:
        return render.one(await need_templates().get(name))

    @app.delete("/api/v1/templates/{name}", tags=["templates"])
    async def delete_template(
        name: NameParam,
        full_clones_first: Annotated[
            bool, Query(description="make each linked clone standalone first")
        ] = False,
    ) -> JSONResponse:
        return render.one(await need_templates().delete(name, full_clones_first=full_clones_first))

    @app.post("/api/v1/templates/{name}/instantiate", tags=["templates"], status_code=202)
    async def instantiate_template(
        name: NameParam,
        body: Annotated[dict[str, Any], Body(examples=[{"name": "app-1", "start": True}])],
        wait: Wait = False,
        timeout: Timeout = 300.0,
    ) -> JSONResponse:
        result = await need_templates().instantiate(name, body, meta(None, None))
        return await vm_accepted(result, wait, timeout)

    # -- this host's hypervisor -----------------------------------------------------------------

    @app.post("/api/v1/local/vms", tags=["hosts"], include_in_schema=False)
    async def host_vms(op: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        if local_vms is None:
            raise Unavailable("this host runs no hypervisor")
        return await local_vms(op)
