"""Join tokens: create (the secret is shown once), list, revoke, and consume at join.

A token reads ``<id>.<secret>``; the store keeps only SHA-256(secret). A join with a missing,
wrong, expired, revoked or used-up token gets the same answer, so a caller learns nothing about
which tokens exist.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from corral.cluster import pki
from corral.errors import Conflict, CorralError, NotFound
from corral.model import Token, TokenCreate, TokenSpec, TokenStatus, utcnow
from corral.model.pki import ClusterPki
from corral.service.context import ServiceContext
from corral.service.validate import parse
from corral.state import Objects, keys
from corral.state.codec import decode

__all__ = ["InvalidToken", "TokenService"]


class InvalidToken(CorralError):
    type_slug = "unauthorized"
    title = "Unauthorized"
    status = 401

    def __init__(self) -> None:
        super().__init__(
            "the join token is not valid (wrong, expired, revoked or used up); ask an operator "
            "for a new one: corral token create"
        )


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    token: Token
    secret: str  # "<id>.<secret>.<CA fingerprint hex>": shown once, never stored


class TokenService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def create(self, body: Any) -> IssuedToken:
        req = parse(TokenCreate, body if body is not None else {})
        now = utcnow()
        token_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(24)
        token = Token(
            name=token_id,
            id=token_id,
            created_at=now,
            updated_at=now,
            spec=TokenSpec(
                role=req.role,
                uses=req.uses,
                expires_at=now + timedelta(seconds=req.ttl_s),
                description=req.description,
            ),
            status=TokenStatus(uses_left=req.uses),
            secret_hash=_hash(secret),
        )
        rev = await self.ctx.store.commit(
            [Objects.put(token)], [Objects.expect_missing(Token, token_id)]
        )
        token.create_revision = token.mod_revision = rev
        # The token pins the cluster's CA: a joining host checks it talks to this cluster.
        pin = await self.ca_fingerprint()
        suffix = "." + pin.removeprefix("sha256:") if pin else ""
        return IssuedToken(token, f"{token_id}.{secret}{suffix}")

    async def ca_fingerprint(self) -> str:
        """``sha256:<hex>`` of the cluster CA's key; "" in a cluster without one."""
        kv = await self.ctx.store.get(keys.PKI)
        if kv is None:
            return ""
        return pki.fingerprint(decode("pki", kv.value, ClusterPki).ca_cert)

    async def list(self) -> tuple[list[Token], int]:
        return await self.ctx.objects.all(Token)

    async def get(self, token_id: str) -> Token:
        return await self.ctx.objects.get(Token, token_id)

    async def revoke(self, token_id: str) -> Token:
        def change(t: Token) -> Token | None:
            if t.status.revoked:
                return None
            t.status.revoked = True
            return t

        updated = await self.ctx.objects.update(Token, token_id, change)
        return updated or await self.get(token_id)

    async def consume(self, presented: str, node: str) -> Token:
        """Check a presented token and count one use, atomically. Raises InvalidToken."""
        token_id, sep, rest = presented.strip().partition(".")
        secret = rest.partition(".")[0]
        if not sep or not secret:
            raise InvalidToken()
        return await self.consume_proven(
            token_id, node, lambda t: hmac.compare_digest(t.secret_hash, _hash(secret))
        )

    async def consume_proven(
        self, token_id: str, node: str, proven: Callable[[Token], bool]
    ) -> Token:
        """Count one use of token ``token_id`` if ``proven(token)`` (the caller's check that
        the holder knows its secret) and it is still valid, atomically. Raises InvalidToken."""
        if not token_id.isalnum() or len(token_id) > 16:
            raise InvalidToken()

        def use(t: Token) -> Token:
            if not proven(t):
                raise InvalidToken()
            if t.status.revoked or t.spec.expires_at <= utcnow():
                raise InvalidToken()
            if t.status.uses_left is not None:
                if t.status.uses_left <= 0:
                    raise InvalidToken()
                t.status.uses_left -= 1
            t.status.used_by = [*t.status.used_by, node][-50:]
            t.status.last_used_at = utcnow()
            return t

        try:
            updated = await self.ctx.objects.update(Token, token_id.lower(), use)
        except NotFound:
            raise InvalidToken() from None
        except Conflict:
            raise InvalidToken() from None
        assert updated is not None
        return updated
