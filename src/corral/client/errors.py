"""Every exception `corral.client` raises, and the one boundary that makes them.

The tree (exit codes are what the `corral` CLI exits with; `exit_code` carries them)::

    CorralError                    anything this package raises                 exit 1
    +-- ApiError                   the API said no, or could not be reached     exit 1
    |   +-- BadRequest             400 malformed                                exit 1
    |   +-- Unauthorized           401 unauthorized                             exit 1
    |   +-- Forbidden              403 forbidden                                exit 1
    |   +-- NotFound               404 not-found                                exit 3
    |   +-- Conflict               409 conflict                                 exit 4
    |   |   +-- QuotaExceeded      409 quota-exceeded                           exit 4
    |   |   +-- Unschedulable      409 unschedulable                            exit 4
    |   +-- PreconditionFailed     412 precondition-failed (stale If-Match)     exit 4
    |   +-- TooLarge               413 too-large                                exit 1
    |   +-- ValidationFailed       422 validation (see `.errors`)               exit 1
    |   +-- ServerError            500 and any other 5xx: a bug in corral       exit 1
    |   +-- Unavailable            502/503/504, connection refused, timeouts    exit 5
    +-- TaskWaitTimeout            `wait_task` gave up before the task ended    exit 1

httpx exceptions never escape: `error_from_transport` and `error_from_response` translate them
here, and the client raises the result `from` the original so the cause stays in tracebacks.
An error body that is not RFC 9457 problem+json (plain text from a proxy, FastAPI's default
`{"detail": ...}`) still becomes the right subclass, chosen by HTTP status.
"""

from __future__ import annotations

import email.utils
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import httpx

__all__ = [
    "ApiError",
    "BadRequest",
    "Conflict",
    "CorralError",
    "FieldError",
    "Forbidden",
    "NotFound",
    "PreconditionFailed",
    "QuotaExceeded",
    "ServerError",
    "TaskWaitTimeout",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "Unschedulable",
    "ValidationFailed",
    "error_from_response",
    "error_from_transport",
]

_PROBLEM_BASE = "https://corral.dev/errors/"
_BODY_SNIPPET = 200


class CorralError(Exception):
    """Base of every error raised by `corral.client`; `message` is one sentence for a human."""

    exit_code: ClassVar[int] = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class FieldError:
    """One rejected field of a request: `memory_mib` broke rule `ge`: "must be >= 64"."""

    field: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class ApiError(CorralError):
    """The API answered with an error (`status` set) or could not be reached (`status` None).

    Attributes: `status` (HTTP status or None), `slug` (the problem type's last path segment,
    e.g. "not-found"), `type_uri` (the full problem type), `title`, `detail`, `errors` (field
    errors, for validation), `request_id` (from the body or the X-Request-Id header; quote it
    when reporting a bug), `retry_after` (seconds, from Retry-After) and `problem` (the raw
    problem body, {} when there was none).
    """

    default_slug: ClassVar[str] = "error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        slug: str | None = None,
        type_uri: str | None = None,
        title: str | None = None,
        detail: str | None = None,
        errors: tuple[FieldError, ...] = (),
        request_id: str | None = None,
        retry_after: float | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.slug = slug or self.default_slug
        self.type_uri = type_uri or _PROBLEM_BASE + self.slug
        self.title = title or ""
        self.detail = detail or message
        self.errors = errors
        self.request_id = request_id
        self.retry_after = retry_after
        self.problem = problem or {}


class BadRequest(ApiError):
    """400: the request could not be parsed."""

    default_slug = "malformed"


class Unauthorized(ApiError):
    """401: no credentials, or they were not accepted."""

    default_slug = "unauthorized"


class Forbidden(ApiError):
    """403: the credentials do not allow this."""

    default_slug = "forbidden"


class NotFound(ApiError):
    """404: no such object (or no such route: check the address points at corral)."""

    default_slug = "not-found"
    exit_code = 3


class Conflict(ApiError):
    """409: the request clashes with the current state (name taken, wrong state, ...)."""

    default_slug = "conflict"
    exit_code = 4


class QuotaExceeded(Conflict):
    """409: a quota would be exceeded."""

    default_slug = "quota-exceeded"


class Unschedulable(Conflict):
    """409: no node can take the VM; the raw `problem` holds the per-node reasons."""

    default_slug = "unschedulable"


class PreconditionFailed(ApiError):
    """412: the object changed since the revision given in If-Match."""

    default_slug = "precondition-failed"
    exit_code = 4


class TooLarge(ApiError):
    """413: the request body is too large."""

    default_slug = "too-large"


class ValidationFailed(ApiError):
    """422: the request was well-formed but broke a rule; `errors` names each field."""

    default_slug = "validation"


class ServerError(ApiError):
    """500 or another 5xx that is not about availability: a bug in corral."""

    default_slug = "internal"


class Unavailable(ApiError):
    """The server cannot answer now (502/503/504) or could not be reached at all.

    For connection failures and timeouts `status` is None and the message tells the operator
    what to check. `retry_after` is set when the server sent Retry-After.
    """

    default_slug = "unavailable"
    exit_code = 5


class TaskWaitTimeout(CorralError):
    """`wait_task` stopped waiting; the task goes on on the server. `task` is its last state."""

    def __init__(self, task_id: str, timeout: float, task: dict[str, Any] | None) -> None:
        status = (task or {}).get("status") or {}
        state = status.get("state", "unknown")
        step = status.get("step")
        where = f"state {state}" + (f", step {step!r}" if step else "")
        super().__init__(f"task {task_id} did not finish within {timeout:g}s ({where})")
        self.task_id = task_id
        self.timeout = timeout
        self.task = task


_CLASS_BY_SLUG: dict[str, type[ApiError]] = {
    cls.default_slug: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        QuotaExceeded,
        Unschedulable,
        PreconditionFailed,
        TooLarge,
        ValidationFailed,
        Unavailable,
    )
}

_CLASS_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
    413: TooLarge,
    422: ValidationFailed,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def _class_for(slug: str | None, status: int) -> type[ApiError]:
    if slug and slug in _CLASS_BY_SLUG:
        return _CLASS_BY_SLUG[slug]
    if status in _CLASS_BY_STATUS:
        return _CLASS_BY_STATUS[status]
    return ServerError if status >= 500 else ApiError


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _field_errors(raw: object) -> tuple[FieldError, ...]:
    """Field errors from a problem's `errors` or FastAPI's list-valued `detail`."""
    if not isinstance(raw, list):
        return ()
    found: list[FieldError] = []
    for item in raw:
        if not isinstance(item, dict):
            continue
        if "field" in item or "rule" in item:
            field, rule = str(item.get("field", "")), str(item.get("rule", ""))
            found.append(FieldError(field, rule, str(item.get("message", ""))))
        elif "loc" in item:  # FastAPI/pydantic: {"loc": ["body", "memory_mib"], "msg", "type"}
            loc = [str(part) for part in item.get("loc") or [] if part not in ("body", "query")]
            found.append(
                FieldError(".".join(loc), str(item.get("type", "")), str(item.get("msg", "")))
            )
    return tuple(found)


def _json_body(response: httpx.Response) -> object:
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None


def error_from_response(response: httpx.Response) -> ApiError:
    """Translate a 4xx/5xx response into the matching `ApiError` subclass (never raises)."""
    status = response.status_code
    request_id = response.headers.get("x-request-id")
    retry_after = _retry_after(response.headers.get("retry-after"))
    body = _json_body(response)
    if isinstance(body, dict) and any(k in body for k in ("type", "title", "detail", "errors")):
        type_uri = str(body.get("type") or "")
        slug = type_uri.rstrip("/").rsplit("/", 1)[-1] if type_uri.startswith("http") else None
        title = str(body.get("title") or response.reason_phrase)
        raw_detail = body.get("detail")
        errors = _field_errors(body.get("errors")) or _field_errors(raw_detail)
        if isinstance(raw_detail, str) and raw_detail:
            detail = raw_detail
        elif errors:
            detail = "; ".join(str(e) for e in errors)
        else:
            detail = title
        cls = _class_for(slug, status)
        if cls is ServerError and detail == title:
            detail = f"{title} (HTTP {status}); this is a bug in corral, the server log has more"
        return cls(
            detail,
            status=status,
            slug=slug,
            type_uri=type_uri or None,
            title=title,
            detail=detail,
            errors=errors,
            request_id=str(body.get("request_id") or request_id or "") or None,
            retry_after=retry_after,
            problem=body,
        )
    cls = _class_for(None, status)
    text = response.content.decode("utf-8", "replace").strip()
    snippet = " ".join(text.split())[:_BODY_SNIPPET]
    message = f"HTTP {status} {response.reason_phrase}".rstrip()
    if snippet and snippet != response.reason_phrase:
        message += f": {snippet}"
    if cls is ServerError:
        message += " (the server sent no problem details; this is a bug in corral)"
    elif cls is Unavailable and retry_after is not None:
        message += f" (retry after {retry_after:g}s)"
    return cls(
        message,
        status=status,
        title=response.reason_phrase,
        request_id=request_id,
        retry_after=retry_after,
    )


def _refused(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or "refused" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def error_from_transport(
    exc: httpx.HTTPError, base_url: str, timeout: float | None = None
) -> ApiError:
    """Translate an httpx failure that produced no response into an `ApiError`.

    Connection failures and timeouts become `Unavailable` with a message saying what to check;
    anything else (a redirect loop, an undecodable body) becomes a plain `ApiError`.
    """
    hint = "is `corral agent` running? set CORRAL_ADDR or --addr"
    if isinstance(exc, httpx.ConnectTimeout):
        return Unavailable(
            f"cannot reach corral at {base_url}: connection timed out — {hint}",
            slug="unavailable",
        )
    if isinstance(exc, httpx.TimeoutException):
        within = f" within {timeout:g}s" if timeout is not None else ""
        return Unavailable(
            f"corral at {base_url} did not answer{within} — the server may be overloaded or "
            "without a leader; retry, or check `corral cluster status`",
            slug="unavailable",
        )
    if isinstance(exc, httpx.ConnectError):
        reason = "connection refused" if _refused(exc) else (str(exc) or "cannot connect")
        return Unavailable(f"cannot reach corral at {base_url}: {reason} — {hint}")
    if isinstance(exc, httpx.TransportError):
        reason = str(exc) or type(exc).__name__
        return Unavailable(
            f"lost the connection to corral at {base_url}: {reason} — retry; if it persists, "
            "check the server's log"
        )
    return ApiError(f"request to corral at {base_url} failed: {exc or type(exc).__name__}")
