"""A remembered answer to a POST that carried an Idempotency-Key."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["IdempotencyRecord"]


class IdempotencyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    body_hash: str
    status_code: int
    response: dict[str, Any]
    expires_at: datetime
