"""RFC 9457 problem+json for every error, with a stable ``type``; never a 500 for bad input."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral.errors import CorralError, FieldError, Unavailable, Unschedulable, ValidationFailed
from corral.telemetry import REQUEST_ID

__all__ = ["install_error_handlers", "problem"]

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
    return problem(exc.status, exc.type_slug, exc.title, exc.detail, errors=errors,
                   headers=headers, extra=extra)  # fmt: skip


def _request_validation(exc: RequestValidationError) -> JSONResponse:
    field_errors: list[FieldError] = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if err.get("type") == "json_invalid":
            return problem(
                400,
                "malformed",
                "Malformed request",
                f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}",
            )
        where = loc[0] if loc else ""
        path = loc[1:] if where in ("body", "query", "path", "header") else loc
        name = ".".join(path) if path else where
        kind = err.get("type", "invalid")
        ctx = err.get("ctx") or {}
        if kind == "missing" and where == "body" and not path:
            return problem(400, "malformed", "Malformed request", "a JSON body is required")
        msg = str(err.get("msg", "invalid"))
        if kind == "greater_than_equal":
            msg = f"must be >= {ctx.get('ge')}"
        elif kind == "less_than_equal":
            msg = f"must be <= {ctx.get('le')}"
        elif kind == "extra_forbidden":
            msg = "unknown field"
        elif kind == "missing":
            msg = "is required"
        elif kind == "value_error":
            msg = str(ctx.get("error", msg))
        rule = {"greater_than_equal": "ge", "less_than_equal": "le", "missing": "required",
                "extra_forbidden": "unknown-field", "string_too_long": "max-length",
                "value_error": "format"}.get(kind, "type" if kind.endswith("_type") else kind)  # fmt: skip
        if kind.endswith("_type") or kind.endswith("_parsing"):
            rule = "type"
            msg = f"{msg} (got {type(err.get('input')).__name__})"
        field_errors.append(FieldError(name, rule, msg))
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
            404: ("not-found", "Not found"),
            405: ("method-not-allowed", "Method not allowed"),
            413: ("too-large", "Request too large"),
        }.get(exc.status_code, ("http", "HTTP error"))
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}; see /api/v1/openapi.json"
        return problem(exc.status_code, slug, title, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def bug(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error (a bug in corral)", exc_info=exc)
        return problem(
            500,
            "internal",
            "Internal error",
            "corral hit a bug handling this request; the server log has the details under "
            "this request id",
        )
