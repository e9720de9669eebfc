"""Join tokens: a host proves one to join. Only a hash of the secret is stored."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.model.common import ObjectMeta, Strict

__all__ = ["Token", "TokenCreate", "TokenSpec", "TokenStatus"]

TokenRole = Literal["server", "compute"]


class TokenCreate(Strict):
    """Body of ``POST /api/v1/tokens``."""

    ttl_s: int = Field(default=3600, ge=1, le=30 * 86400, description="seconds it stays valid")
    uses: int | None = Field(default=None, ge=1, le=10000, description="joins allowed; none: any")
    role: TokenRole = Field(default="server", description="what a host joining with it becomes")
    description: str = Field(default="", max_length=200)


class TokenSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: TokenRole
    uses: int | None
    expires_at: datetime
    description: str = ""


class TokenStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uses_left: int | None
    revoked: bool = False
    used_by: list[str] = Field(default_factory=list)
    last_used_at: datetime | None = None


class Token(ObjectMeta):
    """A join token; ``name`` is its public id, ``secret_hash`` the SHA-256 of its secret."""

    kind: Literal["token"] = "token"
    spec: TokenSpec
    status: TokenStatus
    secret_hash: str
