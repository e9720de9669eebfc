"""Idempotency-Key handling: the same key and body returns the first result; another body
with the same key is a conflict. The record is written in the same transaction as the change."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from corral.errors import Conflict, ValidationFailed
from corral.model import IdempotencyRecord, utcnow
from corral.service.context import ServiceContext
from corral.state import Expect, Put, keys
from corral.state.codec import decode, encode

__all__ = ["IdempotencyGuard"]

_MAX_KEY = 128


class IdempotencyGuard:
    """For one request: ``replay()`` before acting, ``ops()``/``expect()`` in its commit."""

    def __init__(self, ctx: ServiceContext, scope: str, key: str | None, body: Any) -> None:
        self.ctx = ctx
        self.key = key
        if key is not None and (
            not key or len(key) > _MAX_KEY or not key.replace("-", "").isalnum()
        ):
            raise ValidationFailed.one(
                "Idempotency-Key",
                "format",
                f"must be 1-{_MAX_KEY} letters, digits or '-' (a UUID is best)",
            )
        canonical = json.dumps([scope, body], sort_keys=True, separators=(",", ":"), default=str)
        self.body_hash = hashlib.sha256(canonical.encode()).hexdigest()
        self.etcd_key = keys.idempotency_key(scope, key) if key else ""
        self._expired_rev = 0

    async def replay(self, *, stale: bool = False) -> IdempotencyRecord | None:
        """The first result for this key, or None if it is new. Conflict for another body.

        ``stale`` reads the local etcd member only (no quorum round trip): fine before a
        commit, whose ``expect()`` fails if the record changed meanwhile; after such a
        Conflict, read again without it."""
        if not self.key:
            return None
        kv = await self.ctx.store.get(self.etcd_key, serializable=stale)
        if kv is None:
            return None
        record = decode("idempotency", kv.value, IdempotencyRecord)
        if record.expires_at <= utcnow():
            self._expired_rev = kv.mod_revision  # overwritten by this request's record
            return None
        if record.body_hash != self.body_hash:
            raise Conflict(
                f"Idempotency-Key {self.key} was already used with a different request; "
                "use a new key for a new request"
            )
        return record

    def ops(self, status_code: int, refs: dict[str, Any]) -> list[Put]:
        if not self.key:
            return []
        record = IdempotencyRecord(
            body_hash=self.body_hash,
            status_code=status_code,
            response=refs,
            expires_at=utcnow() + timedelta(seconds=self.ctx.settings.idempotency_ttl_s),
        )
        return [Put(self.etcd_key, encode("idempotency", record))]

    def expect(self) -> list[Expect]:
        return [Expect(self.etcd_key, mod_revision=self._expired_rev)] if self.key else []
