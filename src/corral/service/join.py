"""A host joins the cluster: prove a token, get certificates, register, and (servers) become
an etcd learner.

The request carries the token's id and a proof (``corral.cluster.pki.join_proof``: an HMAC of
the request under a key derived from the token's stored hash), never its secret, and one
certificate request per key the host made (``csr``; a server also ``etcd_csr``). The answer
hands the new host what it needs to take part: the cluster id, the servers' addresses, the CA
certificates and its certificates signed by them, for a server the etcd member list to start
its member with, and, sealed with the token (``pki.seal``), the gossip key and (servers) the
``pki_secret`` that opens the CA keys kept in etcd.

Nothing changes before every check passed (CA pin, node name, token proof, requests signed).
"""

from __future__ import annotations

import contextlib
import hmac
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from corral.cluster import pki
from corral.errors import Conflict, CorralError, Malformed, Unavailable, ValidationFailed
from corral.model import ClusterInfo, Node, NodeSpec, NodeStatus, Token, new_id, utcnow
from corral.model.common import Name, Strict
from corral.model.pki import ClusterPki
from corral.service.context import ServiceContext
from corral.service.tokens import InvalidToken, TokenService
from corral.service.validate import parse
from corral.state import Objects, keys
from corral.state.codec import decode

__all__ = ["JoinRequest", "JoinService"]


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
        raise ValueError("must be a URL like http://127.0.0.2:8700")
    return value.rstrip("/")


class JoinRequest(Strict):
    token: str = Field(max_length=200, description="the token's id (the part before the dot)")
    proof: str = Field(max_length=128, description="pki.join_proof of the rest of the request")
    csr: str = Field(max_length=8000, description="PEM request for the host certificate")
    etcd_csr: str | None = Field(default=None, max_length=8000, description="servers: etcd's")
    ca_fingerprint: str | None = Field(
        default=None, max_length=100, description="the CA the token pins: sha256:<hex>"
    )
    name: Name
    role: Literal["server", "compute"] = "server"
    api_url: str = Field(max_length=200)
    grpc_url: str = Field(max_length=200)
    gossip_address: str = Field(max_length=200, description="host:port of the host's serf agent")
    etcd_peer_url: str | None = Field(default=None, max_length=200)
    etcd_client_url: str | None = Field(default=None, max_length=200)

    @field_validator("api_url", "grpc_url", "etcd_peer_url", "etcd_client_url")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        return None if value is None else _url(value)


def _hosts(req: JoinRequest) -> list[str]:
    """The addresses the new host's certificates name: those it gave for its listeners."""
    urls = (req.api_url, req.grpc_url, req.etcd_peer_url, req.etcd_client_url)
    hosts = [urlsplit(u).hostname or "" for u in urls if u]
    hosts.append(req.gossip_address.rpartition(":")[0].strip("[]"))
    return [h for h in dict.fromkeys(hosts) if h]


class JoinService:
    """Answers joins; ``pki_secret`` (this server's, hex) opens the CA keys to sign with."""

    def __init__(self, ctx: ServiceContext, *, pki_secret: str = "") -> None:
        self.ctx = ctx
        self.tokens = TokenService(ctx)
        self.pki_secret = pki_secret

    async def _authorities(self) -> tuple[pki.Authority, pki.Authority]:
        kv = await self.ctx.store.get(keys.PKI)
        if kv is None:
            raise Conflict(
                "this cluster has no CA (it was made by a corral without TLS) and cannot take "
                "new hosts; bootstrap a new cluster"
            )
        if not self.pki_secret:
            raise Unavailable("this server holds no pki_secret; join through another server")
        record = decode("pki", kv.value, ClusterPki)
        secret = self.pki_secret.encode()
        try:
            return (
                pki.Authority.load(record.ca_cert, record.ca_key, secret),
                pki.Authority.load(record.etcd_ca_cert, record.etcd_ca_key, secret),
            )
        except pki.PkiError as exc:
            raise Unavailable(f"this server cannot sign: {exc}") from exc

    async def join(self, body: Any) -> dict[str, Any]:
        req = parse(JoinRequest, body)
        if req.role == "server" and not (req.etcd_peer_url and req.etcd_client_url):
            raise ValidationFailed.one(
                "etcd_peer_url", "required", "a server host must give its etcd peer and client URLs"
            )
        if req.role == "server" and not req.etcd_csr:
            raise ValidationFailed.one(
                "etcd_csr", "required", "a server host must send a request for its etcd certificate"
            )
        store = self.ctx.store
        kv = await store.get(keys.CLUSTER)
        if kv is None:
            raise Conflict("this cluster has not been bootstrapped")
        info = decode("cluster", kv.value, ClusterInfo)
        ca, etcd_ca = await self._authorities()
        if req.ca_fingerprint and req.ca_fingerprint.lower() != ca.fingerprint:
            raise Conflict(
                f"this cluster's CA is {ca.fingerprint}, but the join token pins "
                f"{req.ca_fingerprint}: it is a token of another cluster; ask this cluster's "
                "operator for a token (corral token create), or --join the cluster it belongs to"
            )
        existing = await self.ctx.objects.find(Node, req.name)
        if existing is not None and existing.status.state in ("ready", "unreachable"):
            raise Conflict(
                f"node {req.name!r} is already a {existing.status.state} member of this cluster; "
                f"pick another --name, or remove it first: corral node remove {req.name}"
            )
        # Check the token before changing anything; it is consumed (atomically) further down.
        token_id = req.token.partition(".")[0].lower()
        token = await self.ctx.objects.find(Token, token_id) if token_id.isalnum() else None
        if token is None:
            raise InvalidToken()
        if req.role == "server" and token.spec.role != "server":
            raise InvalidToken()
        raw = body if isinstance(body, dict) else {}

        def proven(t: Token) -> bool:
            return hmac.compare_digest(pki.join_proof(t.secret_hash, raw), req.proof)

        if not proven(token):
            raise InvalidToken()
        hosts = _hosts(req)
        try:
            cert = ca.sign(req.csr, name=req.name, ips=hosts)
            etcd_cert = (
                etcd_ca.sign(req.etcd_csr, name=req.name, ips=hosts) if req.etcd_csr else None
            )
        except pki.PkiError as exc:
            raise Malformed(f"csr: {exc}") from None

        member: dict[str, Any] | None = None
        added_id: int | None = None
        if req.role == "server":
            assert req.etcd_peer_url is not None
            members = await store.members()
            mine = [m for m in members if req.etcd_peer_url in m.peer_urls]
            if mine:
                m = mine[0]
            else:
                try:
                    m = await store.add_member(req.etcd_peer_url, learner=True)
                except Conflict as exc:
                    if "unhealthy cluster" in str(exc):
                        # etcd refuses while a recent member is still settling in.
                        raise Unavailable(
                            "the etcd cluster is settling after a membership change; "
                            "the join is retried shortly",
                            retry_after_s=2,
                        ) from exc
                    if "too many learner" not in str(exc):
                        raise
                    raise Unavailable(
                        "another server host is still an etcd learner (etcd allows one at a "
                        "time): it is promoted once it has caught up and voters are fewer than "
                        "desired_voters. Retry then, raise desired_voters "
                        "(corral cluster set --desired-voters 3), or join this host with "
                        "--no-server",
                        retry_after_s=5,
                    ) from exc
                added_id = m.id
                members = await store.members()
            initial = []
            for other in members:
                name = other.name or (req.name if other.id == m.id else "")
                if name and other.peer_urls:
                    initial.append(f"{name}={other.peer_urls[0]}")
            member = {"id": f"{m.id:x}", "initial_cluster": ",".join(initial)}
        try:
            await self.tokens.consume_proven(token_id, req.name, proven)
        except InvalidToken:
            if added_id is not None:
                with contextlib.suppress(CorralError):
                    await store.remove_member(added_id)
            raise
        await self._register(req, existing)
        secrets = {"gossip_key": info.gossip_key}
        if req.role == "server":
            secrets["pki_secret"] = self.pki_secret
        context = pki.seal_context(req.name, ca.fingerprint)
        answer: dict[str, Any] = {
            "cluster_id": info.id,
            "cluster_name": info.name,
            "gossip_peers": await self._gossip_peers(req.name),
            "servers": await self._servers(),
            "etcd": member,
            "ca_cert": ca.cert_pem.decode(),
            "cert": cert.decode(),
            "sealed": pki.seal(token.secret_hash, secrets, context),
        }
        if etcd_cert is not None:
            answer["etcd_ca_cert"] = etcd_ca.cert_pem.decode()
            answer["etcd_cert"] = etcd_cert.decode()
        return answer

    async def _register(self, req: JoinRequest, existing: Node | None) -> None:
        now = utcnow()
        roles: list[Literal["server", "compute"]] = (
            ["server", "compute"] if req.role == "server" else ["compute"]
        )
        node = existing or Node(name=req.name, id=new_id(), created_at=now, updated_at=now)
        node.spec = NodeSpec(labels=node.spec.labels, roles=roles)
        node.status = NodeStatus(
            state="not-ready",
            address=req.api_url,
            grpc_address=req.grpc_url,
            gossip_address=req.gossip_address,
            etcd_peer_url=req.etcd_peer_url or "",
            etcd_client_url=req.etcd_client_url or "",
            registered_at=now,
            message="joined; waiting for its first heartbeat",
        )
        node.updated_at = now
        expect = (
            Objects.expect_unchanged(existing)
            if existing is not None
            else Objects.expect_missing(Node, req.name)
        )
        await self.ctx.store.commit([Objects.put(node)], [expect])

    async def _servers(self) -> list[dict[str, str]]:
        nodes, _ = await self.ctx.objects.all(Node)
        return [
            {
                "name": n.name,
                "api_url": n.status.address,
                "grpc_url": n.status.grpc_address,
                "etcd_client_url": n.status.etcd_client_url,
            }
            for n in nodes
            if "server" in n.spec.roles and n.status.state != "left"
        ]

    async def _gossip_peers(self, joining: str) -> list[str]:
        nodes, _ = await self.ctx.objects.all(Node)
        return [
            n.status.gossip_address
            for n in nodes
            if n.name != joining and n.status.gossip_address and n.status.state != "left"
        ]
