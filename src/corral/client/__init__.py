"""Typed Python client of the corral REST API v1 (used by the CLI, tests and tooling).

Objects come back exactly as the API's JSON (plain dicts); failures are the exceptions of
`corral.client.errors`, each carrying the CLI exit code. This package imports only httpx and
the standard library.

    with CorralClient("127.0.0.1:8700") as client:
        result = client.create_vm({"name": "web-1", "vcpus": 2, "memory_mib": 512})
        task = client.wait_task(result["task"]["id"], timeout=120)
"""

from __future__ import annotations

from corral.client._client import CorralClient
from corral.client._resources import (
    DEFAULT_ADDR,
    DEFAULT_PORT,
    TASK_FINAL_STATES,
    VM_ACTIONS,
    ActionResult,
    ApiObject,
    Page,
    Pager,
    if_match_value,
    normalize_addr,
    task_state,
)
from corral.client.errors import (
    ApiError,
    BadRequest,
    Conflict,
    CorralError,
    FieldError,
    Forbidden,
    NotFound,
    PreconditionFailed,
    QuotaExceeded,
    ServerError,
    TaskWaitTimeout,
    TooLarge,
    Unauthorized,
    Unavailable,
    Unschedulable,
    ValidationFailed,
)

__all__ = [
    "DEFAULT_ADDR",
    "DEFAULT_PORT",
    "TASK_FINAL_STATES",
    "VM_ACTIONS",
    "ActionResult",
    "ApiError",
    "ApiObject",
    "BadRequest",
    "Conflict",
    "CorralClient",
    "CorralError",
    "FieldError",
    "Forbidden",
    "NotFound",
    "Page",
    "Pager",
    "PreconditionFailed",
    "QuotaExceeded",
    "ServerError",
    "TaskWaitTimeout",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "Unschedulable",
    "ValidationFailed",
    "if_match_value",
    "normalize_addr",
    "task_state",
]
