"""What every use-case needs: the store, typed objects and who is asking."""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.model import new_id
from corral.state import Objects, Store

__all__ = ["RequestMeta", "ServiceContext", "ServiceSettings"]


@dataclass(frozen=True)
class RequestMeta:
    """Stamped by the API before anything is replicated."""

    request_id: str = field(default_factory=new_id)
    actor: str = "anonymous"
    idempotency_key: str | None = None
    if_match: int | None = None
    trace_id: str = ""


@dataclass(frozen=True)
class ServiceSettings:
    task_timeout_s: float = 600.0
    idempotency_ttl_s: float = 24 * 3600.0
    max_wait_s: float = 300.0


@dataclass
class ServiceContext:
    store: Store
    settings: ServiceSettings = field(default_factory=ServiceSettings)

    @property
    def objects(self) -> Objects:
        return Objects(self.store)
