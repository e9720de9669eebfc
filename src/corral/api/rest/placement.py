"""REST routes of placement: vm why, capacity, groups, node cordon / maintenance / drain,
cluster rebalance (task cancel is in app.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse

from corral.api.rest import render
from corral.errors import Malformed
from corral.model import Node, Task
from corral.service.context import RequestMeta
from corral.service.groups import GroupService
from corral.service.operations import OperationService
from corral.service.placement import PlacementService
from corral.telemetry import REQUEST_ID

__all__ = ["add_placement_routes"]

NameParam = Annotated[str, Path(max_length=63, description="a DNS label")]
DryRun = Annotated[bool, Query(description="plan only: change nothing, say what would happen")]


async def _optional_json(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return await request.json()
    except ValueError as exc:
        raise Malformed(f"the body is not valid JSON: {exc}") from None


def _node_task(node: Node, task: Task | None, plan: dict[str, Any] | None) -> JSONResponse:
    headers = {"ETag": f'"{node.mod_revision}"'}
    data: dict[str, Any] = {"object": render.obj(node), "task": None}
    if task is not None:
        data["task"] = render.obj(task)
        headers["Location"] = f"/api/v1/tasks/{task.id}"
    if plan is not None:
        data["plan"] = plan
    return JSONResponse(data, 202 if task is not None else 200, headers=headers)


def add_placement_routes(
    app: FastAPI,
    *,
    placement: PlacementService,
    groups: GroupService,
    operations: OperationService,
) -> None:
    """Register the routes (before the generic ``/vms/{name}/{action}`` route)."""

    @app.get("/api/v1/vms/{name}/placement", tags=["vms"])
    async def vm_placement(name: NameParam) -> JSONResponse:
        """Why the VM is where it is (or pending): every host with the filter that rejected it
        or its scores (``corral vm why``)."""
        return JSONResponse(await placement.why(name))

    @app.get("/api/v1/capacity", tags=["cluster"])
    async def capacity(
        vcpus: Annotated[int, Query(ge=1, le=256)] = 1,
        memory_mib: Annotated[int, Query(ge=1)] = 512,
        tolerate_failures: Annotated[int, Query(ge=0, le=100)] = 0,
    ) -> JSONResponse:
        """How many more VMs of this shape fit, per host and in total (with
        ``tolerate_failures=N``: while keeping room to survive N host failures)."""
        return JSONResponse(await placement.capacity(vcpus, memory_mib, tolerate_failures))

    # -- groups -------------------------------------------------------------------------------

    @app.get("/api/v1/groups", tags=["groups"])
    async def list_groups() -> JSONResponse:
        items, revision = await groups.list()
        return render.listing(items, None, revision)

    @app.post("/api/v1/groups", tags=["groups"], status_code=201)
    async def create_group(
        body: Annotated[
            dict[str, Any],
            Body(examples=[{"name": "web", "policy": "anti-affinity", "max_per_node": 1}]),
        ],
    ) -> JSONResponse:
        return render.one(await groups.create(body), 201)

    @app.get("/api/v1/groups/{name}", tags=["groups"])
    async def get_group(name: NameParam) -> JSONResponse:
        return render.one(await groups.get(name))

    @app.delete("/api/v1/groups/{name}", tags=["groups"])
    async def delete_group(name: NameParam) -> JSONResponse:
        return render.one(await groups.delete(name))

    # -- nodes --------------------------------------------------------------------------------

    @app.patch("/api/v1/nodes/{name}", tags=["nodes"])
    async def patch_node(
        name: NameParam,
        patch: Annotated[dict[str, Any], Body(examples=[{"reserved_memory_mib": 2048}])],
    ) -> JSONResponse:
        """Merge-patch the node's spec: cordoned, maintenance, reserved_vcpus,
        reserved_memory_mib, cpu_allocation_ratio, memory_allocation_ratio."""
        return render.one(await operations.patch_node(name, patch))

    @app.post("/api/v1/nodes/{name}/cordon", tags=["nodes"])
    async def cordon(name: NameParam) -> JSONResponse:
        return render.one(await operations.cordon(name, True))

    @app.post("/api/v1/nodes/{name}/uncordon", tags=["nodes"])
    async def uncordon(name: NameParam) -> JSONResponse:
        return render.one(await operations.cordon(name, False))

    @app.post("/api/v1/nodes/{name}/undrain", tags=["nodes"])
    async def undrain(name: NameParam) -> JSONResponse:
        """Uncordon the node and stop its drain (moves under way finish)."""
        return render.one(await operations.undrain(name))

    @app.post("/api/v1/nodes/{name}/maintenance/{mode}", tags=["nodes"])
    async def maintenance(
        name: NameParam, mode: Annotated[str, Path(pattern="^(on|off)$")]
    ) -> JSONResponse:
        """on: the node must hold no VMs (drain it first); off: back in service."""
        return render.one(await operations.maintenance(name, mode == "on"))

    @app.post("/api/v1/nodes/{name}/drain", tags=["nodes"], status_code=202)
    async def drain(request: Request, name: NameParam, dry_run: DryRun = False) -> JSONResponse:
        """Cordon the node and move every VM away (a task). Blockers (a VM that fits nowhere,
        a VM pinned by a local volume) refuse it with 409 unless ``{"force": true}``."""
        body = await _optional_json(request)
        meta = RequestMeta(request_id=REQUEST_ID.get())
        node, task, plan = await operations.drain(name, body, meta, dry_run=dry_run)
        return _node_task(node, task, plan)

    # -- cluster ------------------------------------------------------------------------------

    @app.post("/api/v1/cluster/rebalance", tags=["cluster"], status_code=202)
    async def rebalance(request: Request, dry_run: DryRun = False) -> JSONResponse:
        """The rebalancer's moves and imbalance score before/after; without dry_run, a task
        that runs them."""
        body = await _optional_json(request)
        meta = RequestMeta(request_id=REQUEST_ID.get())
        plan, task = await operations.rebalance(body, meta, dry_run=dry_run)
        data: dict[str, Any] = {"plan": plan, "task": render.obj(task) if task else None}
        return JSONResponse(data, 202 if task is not None else 200)
