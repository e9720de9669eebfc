"""The one exception tree of the corral server side.

    CorralError                      base; carries a stable ``type`` slug and an HTTP status
    ├── ValidationFailed   (422)     a field broke a rule; ``errors`` lists field, rule, message
    ├── Malformed          (400)     the request could not be parsed at all
    ├── TooLarge           (413)     the request body is over the limit
    ├── NotFound           (404)     the named object does not exist
    ├── Conflict           (409)     the object exists, or changed under us (retry with fresh state)
    │   └── Unschedulable  (409)     no node can take the VM; ``reasons`` per node
    ├── PreconditionFailed (412)     If-Match named a revision that is no longer current
    ├── Unavailable        (503)     the state store or the leader cannot be reached right now
    └── DriverError                  the hypervisor failed an operation (agent side)

Third-party errors (aetcd, grpc, OS) are translated into this tree at one boundary each
(``corral.state.store`` for etcd, ``corral.agent.drivers`` for hypervisors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "Conflict",
    "CorralError",
    "DriverError",
    "FieldError",
    "Malformed",
    "NotFound",
    "PreconditionFailed",
    "TooLarge",
    "Unavailable",
    "Unschedulable",
    "ValidationFailed",
]


@dataclass(frozen=True)
class FieldError:
    """One broken rule: ``field`` is a dotted path, ``rule`` a short stable word."""

    field: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class CorralError(Exception):
    """Base of every error corral raises on purpose."""

    type_slug = "internal"
    title = "Internal error"
    status = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ValidationFailed(CorralError):
    type_slug = "validation"
    title = "Invalid request"
    status = 422

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(str(e) for e in errors) or "invalid request")
        self.errors = errors

    @classmethod
    def one(cls, field_name: str, rule: str, message: str) -> ValidationFailed:
        return cls([FieldError(field_name, rule, message)])


class Malformed(CorralError):
    type_slug = "malformed"
    title = "Malformed request"
    status = 400


class TooLarge(CorralError):
    type_slug = "too-large"
    title = "Request too large"
    status = 413


class NotFound(CorralError):
    type_slug = "not-found"
    title = "Not found"
    status = 404


class Conflict(CorralError):
    type_slug = "conflict"
    title = "Conflict"
    status = 409


@dataclass(frozen=True)
class NodeReason:
    """Why one node was not chosen."""

    node: str
    reason: str
    extra: dict[str, object] = field(default_factory=dict)


class Unschedulable(Conflict):
    type_slug = "unschedulable"
    title = "No node can take this"

    def __init__(self, detail: str, reasons: list[NodeReason]) -> None:
        super().__init__(detail)
        self.reasons = reasons


class PreconditionFailed(CorralError):
    type_slug = "precondition-failed"
    title = "Precondition failed"
    status = 412


class Unavailable(CorralError):
    type_slug = "unavailable"
    title = "Service unavailable"
    status = 503

    def __init__(self, detail: str, retry_after_s: int = 2) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class DriverError(CorralError):
    type_slug = "driver"
    title = "Hypervisor error"
    status = 500
