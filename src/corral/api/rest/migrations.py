"""REST routes of live migration: ``POST /api/v1/vms/{name}/migrate`` and
``GET /api/v1/migrations/{vm}`` (the record). ``POST /api/v1/tasks/{id}/cancel`` (one route
for migrations, drains and rebalances) is in ``app.py``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse

from corral.api.rest import render
from corral.errors import Malformed
from corral.model import Migration
from corral.service.migrations import MigrationService
from corral.service.vms import Accepted

__all__ = ["add_migration_routes"]


def add_migration_routes(
    app: FastAPI,
    migrations: MigrationService,
    finish: Callable[[Accepted, bool, float], Awaitable[JSONResponse]],
    meta: Callable[[str | None, str | None], Any],
) -> None:
    """Register the routes (before the generic ``/vms/{name}/{action}`` route)."""

    @app.post("/api/v1/vms/{name}/migrate", tags=["vms"], status_code=202)
    async def migrate_vm(
        request: Request,
        name: Annotated[str, Path(max_length=63, description="a DNS label")],
        dry_run: Annotated[
            bool, Query(description="say where it would go and why; change nothing")
        ] = False,
        wait: Annotated[bool, Query(description="return when the task has ended")] = False,
        timeout: Annotated[float, Query(gt=0, le=3600)] = 60.0,
    ) -> JSONResponse:
        """Live-migrate a running VM (body: ``target``, ``max_downtime_ms``,
        ``bandwidth_mib_s``, ``timeout_s``; no target: the scheduler picks one)."""
        raw = await request.body()
        body = None
        if raw.strip():
            try:
                body = await request.json()
            except ValueError as exc:
                raise Malformed(f"the body is not valid JSON: {exc}") from None
        result = await migrations.migrate(name, body, meta(None, None), dry_run=dry_run)
        if isinstance(result, dict):
            return JSONResponse(result, 200)
        return await finish(result, wait, timeout)

    @app.get("/api/v1/migrations/{name}", tags=["vms"])
    async def get_migration(
        name: Annotated[str, Path(max_length=63, description="the vm's name")],
    ) -> JSONResponse:
        """The VM's current (or last) migration: phase, both hosts' reports."""
        return render.one(await migrations.ctx.objects.get(Migration, name))
