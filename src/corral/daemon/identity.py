"""What a host remembers about its cluster (``<data-dir>/cluster.json``, mode 0600), its
certificates (``<data-dir>/pki/``), and the join handshake that first fills both in.

The join, seen from the joining host (see ``corral.cluster.pki`` for the crypto):

1. It makes its keys here (they never leave the host) and certificate requests for them.
2. It POSTs them to ``/api/v1/join`` with the token's id and a proof (an HMAC of the request
   under a key derived from the token), never the token's secret, and with the CA fingerprint
   the token pins: a cluster with another CA refuses at once, before it changes anything.
3. It checks the answer: the CA is the one the token pins, its certificates were issued by
   that CA for its own keys, and the secrets (gossip key; for a server the ``pki_secret`` that
   opens the CA keys in etcd) were sealed with the token, so whatever answered knows it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

from corral.agent.remote import client_credentials
from corral.api.grpc.node import server_credentials
from corral.cluster import pki
from corral.cluster.etcd import EtcdTlsFiles
from corral.model.pki import ClusterPki
from corral.state.store import EtcdTls

__all__ = [
    "PKI_VERSION",
    "ClusterIdentity",
    "HostPki",
    "JoinRefused",
    "bootstrap_pki",
    "join_cluster",
    "request_join",
]

FILE = "cluster.json"
# 1: the data dir has its certificates and etcd runs with TLS. Data dirs from before lack it.
PKI_VERSION = 1
log = logging.getLogger(__name__)

NO_TLS = (
    "{where} was made by a corral without TLS (before its cluster CA existed); upgrading such "
    "a cluster in place is not supported. Start this host from a new --data-dir and "
    "--bootstrap a new cluster (or --join one), then recreate its VMs there"
)


class JoinRefused(RuntimeError):
    """The join did not happen; the message says why and what to do."""


@dataclass
class ClusterIdentity:
    cluster_id: str
    role: str  # "server" | "compute"
    gossip_key: str
    servers: list[dict[str, str]] = field(default_factory=list)
    gossip_peers: list[str] = field(default_factory=list)
    # Set on a server that joined: the etcd member list to start its member with, once.
    etcd_initial_cluster: str = ""
    # PKI_VERSION once this host has its certificates; 0 in data dirs from before TLS.
    pki: int = 0
    # Servers only: opens the CA keys kept (encrypted) in etcd, to sign joins. Hex.
    pki_secret: str = ""

    @classmethod
    def load(cls, data_dir: Path) -> ClusterIdentity | None:
        """The remembered identity, None when there is none; JoinRefused (saying what to do)
        when it is unreadable or from before TLS."""
        path = data_dir / FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise JoinRefused(f"{path} is unreadable ({exc}); restore it or rejoin") from exc
        identity = cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})
        if identity.pki != PKI_VERSION:
            raise JoinRefused(NO_TLS.format(where=data_dir))
        HostPki(data_dir).check(identity.role)
        return identity

    def save(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @property
    def server_api_urls(self) -> list[str]:
        return [s["api_url"] for s in self.servers if s.get("api_url")]

    @property
    def server_grpc_urls(self) -> list[str]:
        return [s["grpc_url"] for s in self.servers if s.get("grpc_url")]

    @property
    def etcd_client_urls(self) -> list[str]:
        return [s["etcd_client_url"] for s in self.servers if s.get("etcd_client_url")]


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class HostPki:
    """A host's TLS files in ``<data-dir>/pki``: the cluster CA, its host certificate and key;
    on a server also the etcd CA and its etcd certificate and key. Keys are mode 0600."""

    data_dir: Path

    FILES = ("ca.crt", "host.crt", "host.key")
    SERVER_FILES = ("etcd-ca.crt", "etcd.crt", "etcd.key")

    @property
    def dir(self) -> Path:
        return self.data_dir / "pki"

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def save(self, files: dict[str, bytes]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        for name, data in files.items():
            _write_private(self.dir / name, data)

    def check(self, role: str) -> None:
        """JoinRefused when a file is missing or a certificate does not fit its CA or key."""
        names = [*self.FILES, *(self.SERVER_FILES if role == "server" else ())]
        missing = [n for n in names if not (self.dir / n).exists()]
        if missing:
            raise JoinRefused(
                f"{self.dir} lacks {', '.join(missing)}: this host's certificates are gone; "
                "restore them from a backup, or start from a new --data-dir and join again"
            )
        try:
            pki.verify_cert(
                self.read("host.crt"), self.read("ca.crt"), key_pem=self.read("host.key")
            )
            if role == "server":
                pki.verify_cert(
                    self.read("etcd.crt"), self.read("etcd-ca.crt"), key_pem=self.read("etcd.key")
                )
        except pki.PkiError as exc:
            raise JoinRefused(
                f"{self.dir}: {exc}; this host has to join the cluster again"
            ) from exc

    @property
    def ca_fingerprint(self) -> str:
        return pki.fingerprint(self.read("ca.crt"))

    def etcd_files(self) -> EtcdTlsFiles:
        return EtcdTlsFiles(
            ca=self.dir / "etcd-ca.crt", cert=self.dir / "etcd.crt", key=self.dir / "etcd.key"
        )

    def etcd_tls(self) -> EtcdTls:
        return EtcdTls(self.read("etcd-ca.crt"), self.read("etcd.crt"), self.read("etcd.key"))

    def grpc_server(self) -> grpc.ServerCredentials:
        return server_credentials(self.read("ca.crt"), self.read("host.crt"), self.read("host.key"))

    def grpc_client(self) -> grpc.ChannelCredentials:
        return client_credentials(self.read("ca.crt"), self.read("host.crt"), self.read("host.key"))


def bootstrap_pki(data_dir: Path, name: str, addresses: list[str]) -> tuple[str, ClusterPki]:
    """Make a new cluster's two CAs and this (first) server's certificates.

    Writes the certificates and keys to ``<data-dir>/pki`` and returns the new ``pki_secret``
    (hex) and the CA record for etcd, whose keys are encrypted with that secret; the record is
    also kept in ``pki/bootstrap.json`` until it is in etcd."""
    secret = os.urandom(32).hex()
    ca = pki.new_authority("corral cluster CA")
    etcd_ca = pki.new_authority("corral etcd CA")
    host = ca.issue(name, ips=addresses)
    etcd = etcd_ca.issue(name, ips=addresses)
    record = ClusterPki(
        ca_cert=ca.cert_pem.decode(),
        ca_key=ca.key_pem(secret.encode()).decode(),
        etcd_ca_cert=etcd_ca.cert_pem.decode(),
        etcd_ca_key=etcd_ca.key_pem(secret.encode()).decode(),
    )
    HostPki(data_dir).save(
        {
            "ca.crt": ca.cert_pem,
            "host.crt": host.cert_pem,
            "host.key": host.key_pem,
            "etcd-ca.crt": etcd_ca.cert_pem,
            "etcd.crt": etcd.cert_pem,
            "etcd.key": etcd.key_pem,
            "bootstrap.json": record.model_dump_json().encode(),
        }
    )
    return secret, record


async def join_cluster(
    addr: str, token: str, fields: dict[str, Any], *, name: str, role: str
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Join through ``addr`` with ``token``: returns the checked answer (with its sealed
    secrets opened in) and the files for ``HostPki.save``. JoinRefused saying why."""
    try:
        tok = pki.parse_token(token)
    except pki.PkiError as exc:
        raise JoinRefused(str(exc)) from exc
    host_key = pki.new_key()
    body: dict[str, Any] = {
        **fields,
        "name": name,
        "role": role,
        "token": tok.id,
        "csr": pki.make_csr(host_key, name).decode(),
    }
    etcd_key = pki.new_key() if role == "server" else None
    if etcd_key is not None:
        body["etcd_csr"] = pki.make_csr(etcd_key, name).decode()
    if tok.ca_fingerprint:
        body["ca_fingerprint"] = tok.ca_fingerprint
    else:
        log.warning(
            "the join token pins no CA fingerprint: the cluster is trusted because it knows the "
            "token; use a token printed by `corral token create` to pin its CA"
        )
    body["proof"] = pki.join_proof(tok.secret_hash, body)
    answer = await request_join(addr, body)
    try:
        ca_pem = str(answer["ca_cert"]).encode()
        found = pki.fingerprint(ca_pem)
        if tok.ca_fingerprint and found != tok.ca_fingerprint:
            raise JoinRefused(
                f"the cluster at {addr} has CA {found}, but the token pins {tok.ca_fingerprint}: "
                "the token belongs to another cluster, or something else answers at that address"
            )
        secrets = pki.unseal(tok.secret_hash, str(answer["sealed"]), pki.seal_context(name, found))
        host_pem = pki.key_pem(host_key)
        cert_pem = str(answer["cert"]).encode()
        pki.verify_cert(cert_pem, ca_pem, key_pem=host_pem)
        files = {"ca.crt": ca_pem, "host.crt": cert_pem, "host.key": host_pem}
        if etcd_key is not None:
            etcd_ca_pem = str(answer["etcd_ca_cert"]).encode()
            etcd_pem = pki.key_pem(etcd_key)
            etcd_cert = str(answer["etcd_cert"]).encode()
            pki.verify_cert(etcd_cert, etcd_ca_pem, key_pem=etcd_pem)
            files |= {"etcd-ca.crt": etcd_ca_pem, "etcd.crt": etcd_cert, "etcd.key": etcd_pem}
    except KeyError as exc:
        raise JoinRefused(
            f"the join answer lacks {exc}: is {addr} a corral of this version?"
        ) from exc
    except pki.PkiError as exc:
        raise JoinRefused(f"the join answer of {addr} is not acceptable: {exc}") from exc
    return {**answer, **secrets}, files


def _api_base(addr: str) -> str:
    addr = addr.strip().rstrip("/")
    if "://" not in addr:
        addr = "http://" + addr
    host_part = addr.split("://", 1)[1]
    if ":" not in host_part.rsplit("]", 1)[-1]:
        addr += ":8700"
    return addr


def _detail(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("detail", resp.text))
    except ValueError:
        return resp.text


async def request_join(
    addr: str, body: dict[str, Any], *, retry_for_s: float = 180.0
) -> dict[str, Any]:
    """POST /api/v1/join on ``addr``; JoinRefused with the server's reason on any failure."""
    url = _api_base(addr) + "/api/v1/join"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for_s
    while True:
        try:
            async with httpx.AsyncClient(timeout=30.0) as client:
                resp = await client.post(url, json=body)
        except httpx.HTTPError as exc:
            raise JoinRefused(
                f"cannot reach {url}: {exc}; check --join (any host of the cluster, e.g. "
                "10.0.0.1 or 10.0.0.1:8700)"
            ) from exc
        # 503: the cluster cannot take this host right now (e.g. another server is catching
        # up); it says when to come back.
        if resp.status_code != 503 or loop.time() >= deadline:
            break
        wait = float(resp.headers.get("retry-after", "5"))
        log.info("join deferred by the cluster (%s); retrying in %.0fs", _detail(resp), wait)
        await asyncio.sleep(wait)
    if resp.status_code != 200:
        raise JoinRefused(f"the cluster refused the join ({resp.status_code}): {_detail(resp)}")
    data: dict[str, Any] = resp.json()
    return data
