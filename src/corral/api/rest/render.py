"""API shapes (api.md): every object as kind, name, id, spec, status, revisions, times."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from corral.model import Task, Vm
from corral.model.common import ObjectMeta

__all__ = ["accepted", "listing", "obj", "one"]

_FIRST = ("kind", "name", "id", "spec", "status")


def obj(o: ObjectMeta) -> dict[str, Any]:
    data = o.model_dump(mode="json")
    data.pop("deadline_at", None)
    data.pop("secret_hash", None)  # a token's secret is shown once, at creation, and never again
    ordered = {k: data.pop(k) for k in _FIRST if k in data}
    ordered.update(data)
    return ordered


def one(o: ObjectMeta, status: int = 200) -> JSONResponse:
    return JSONResponse(obj(o), status, headers={"ETag": f'"{o.mod_revision}"'})


def listing(items: list[Any], next_cursor: str | None, revision: int) -> JSONResponse:
    return JSONResponse(
        {"items": [obj(i) for i in items], "next_cursor": next_cursor, "revision": revision}
    )


def accepted(vm: Vm | None, task: Task, status: int) -> JSONResponse:
    headers = {"Location": f"/api/v1/tasks/{task.id}"}
    if vm is not None:
        headers["ETag"] = f'"{vm.mod_revision}"'
    return JSONResponse(
        {"object": obj(vm) if vm is not None else None, "task": obj(task)}, status, headers=headers
    )
