"""RFC 9457 problem+json for every error, with a stable ``type``; never a 500 for bad input."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral.errors import CorralError, FieldError, Unavailable, Unschedulable, ValidationFailed
from corral.service.validate import to_field_error
from corral.telemetry import REQUEST_ID

__all__ = ["bug_response", "install_error_handlers", "problem"]

log = logging.getLogger(__name__)
TYPE_BASE = "https://corral.dev/errors/"


def problem(
    status: int,
    slug: str,
    title: str,
    detail: str,
    *,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": TYPE_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": REQUEST_ID.get(),
    }
    if errors:
        body["errors"] = [{"field": e.field, "rule": e.rule, "message": e.message} for e in errors]
    if extra:
        body.update(extra)
    return JSONResponse(body, status, headers=headers, media_type="application/problem+json")


def bug_response() -> JSONResponse:
    """A 500 that says it is a bug, and where to look."""
    return problem(
        500,
        "internal",
        "Internal error",
        "corral hit a bug handling this request; the agent log has the details under this "
        "request id",
    )


def _from_corral(exc: CorralError) -> JSONResponse:
    headers = {}
    extra: dict[str, Any] = {}
    errors = exc.errors if isinstance(exc, ValidationFailed) else None
    if isinstance(exc, Unavailable):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, Unschedulable):
        extra["reasons"] = [{"node": r.node, "reason": r.reason} for r in exc.reasons]
    if exc.status >= 500 and not isinstance(exc, Unavailable):
        log.error("internal error: %s", exc.detail, exc_info=exc)
    return problem(
        exc.status,
        exc.type_slug,
        exc.title,
        exc.detail,
        errors=errors,
        headers=headers,
        extra=extra,
    )


def _request_validation(exc: RequestValidationError) -> JSONResponse:
    field_errors: list[FieldError] = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        where = loc[0] if loc else ""
        path = loc[1:] if where in ("body", "query", "path", "header") else loc
        if err.get("type") == "json_invalid":
            error = (err.get("ctx") or {}).get("error", err.get("msg"))
            return problem(
                400, "malformed", "Malformed request", f"the body is not valid JSON: {error}"
            )
        if err.get("type") == "missing" and where == "body" and not path:
            return problem(400, "malformed", "Malformed request", "a JSON body is required")
        field_errors.append(to_field_error(err, ".".join(path) if path else where))
    return _from_corral(ValidationFailed(field_errors))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CorralError)
    async def corral_error(_: Request, exc: CorralError) -> JSONResponse:
        return _from_corral(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _request_validation(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug, title = {
            400: ("malformed", "Malformed request"),
            404: ("not-found", "Not found"),
            405: ("method-not-allowed", "Method not allowed"),
            413: ("too-large", "Request too large"),
        }.get(exc.status_code, ("http", "HTTP error"))
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = (
                f"no such endpoint: {request.method} {request.url.path}; see /api/v1/openapi.json"
            )
        return problem(exc.status_code, slug, title, detail, headers=getattr(exc, "headers", None))
