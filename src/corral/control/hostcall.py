"""Asking one host to do something only it can do (a file on its own disk), over its API.

Every agent serves ``POST /api/v1/local/storage`` for its own disks; servers and the leader call
it here with an operation document. A host that does not answer is ``Unavailable`` (the caller
says what to do); a host that refused says why in its problem document, which is re-raised as
the same kind of error.
"""

from __future__ import annotations

from typing import Any

import httpx

from corral.errors import (
    Conflict,
    CorralError,
    FieldError,
    NotFound,
    Unavailable,
    ValidationFailed,
)
from corral.model import Node

__all__ = ["call_host_storage", "call_host_vms"]

_TIMEOUT_S = 120.0


async def call_host_storage(node: Node, op: dict[str, Any]) -> dict[str, Any]:
    """Run ``op`` on ``node``'s storage; its JSON answer."""
    return await _call_host(node, "/api/v1/local/storage", op)


async def call_host_vms(node: Node, op: dict[str, Any], timeout_s: float = 900.0) -> dict[str, Any]:
    """Run ``op`` (snapshots, disk copies) on ``node``'s hypervisor; its JSON answer."""
    return await _call_host(node, "/api/v1/local/vms", op, timeout_s)


async def _call_host(
    node: Node, path: str, op: dict[str, Any], timeout_s: float = _TIMEOUT_S
) -> dict[str, Any]:
    base = node.status.address.rstrip("/")
    if not base:
        raise Unavailable(f"host {node.name} has no API address yet; retry once it registered")
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            resp = await client.post(f"{base}{path}", json=op)
    except httpx.HTTPError as exc:
        raise Unavailable(
            f"host {node.name} did not answer ({exc or type(exc).__name__}); its disks can only "
            "be changed through it: retry when it is back"
        ) from exc
    if resp.status_code == 200:
        answer = resp.json()
        return answer if isinstance(answer, dict) else {}
    try:
        problem = resp.json()
        detail = str(problem.get("detail", resp.text))
        errors = problem.get("errors") or []
    except (ValueError, AttributeError):
        detail, errors = resp.text, []
    if resp.status_code == 422 and errors:
        raise ValidationFailed(
            [FieldError(e["field"], e["rule"], f"host {node.name}: {e['message']}") for e in errors]
        )
    detail = f"host {node.name}: {detail}"
    if resp.status_code == 404:
        raise NotFound(detail)
    if resp.status_code == 409:
        raise Conflict(detail)
    if resp.status_code == 503:
        raise Unavailable(detail)
    raise CorralError(detail)
