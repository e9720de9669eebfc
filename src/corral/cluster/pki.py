"""The cluster's PKI: its certificate authorities, host certificates, and the join's crypto.

Two authorities are made at bootstrap, both EC P-256, both valid ten years:

- the *cluster CA* signs every host's certificate (servers and compute hosts alike); the gRPC
  NodeService trusts it both ways. Its fingerprint is what a join token pins.
- the *etcd CA* signs the servers' etcd certificates only; etcd trusts nothing else, so a
  compute host's certificate opens no door to the store.

Host certificates are valid for both TLS server and client use, name the host (CN and a DNS
SAN) and its bind address (an IP SAN), and last ``HOST_CERT_DAYS``.

A fingerprint is ``sha256:<hex>`` of the certificate's SubjectPublicKeyInfo, like kubeadm's
``--discovery-token-ca-cert-hash``: it names the key, so a re-issued CA certificate with the
same key keeps it.

The join: a token is ``<id>.<secret>[.<fingerprint hex>]`` and etcd keeps only
``SHA-256(secret)``. Both sides derive keys from that hash with HKDF: the joining host signs
its request with one (``join_proof``) so the secret never crosses the wire, and the server
seals the answer's secrets with the other (``seal``/``unseal``, AES-GCM), which proves to the
joining host that it talks to a cluster that knows the token.

Every failure is a ``PkiError`` whose message says what is wrong and what to do.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_DAYS",
    "HOST_CERT_DAYS",
    "Authority",
    "CertKey",
    "JoinToken",
    "PkiError",
    "canonical",
    "cert_names",
    "fingerprint",
    "join_proof",
    "key_pem",
    "load_cert",
    "make_csr",
    "new_authority",
    "new_key",
    "parse_token",
    "seal",
    "seal_context",
    "unseal",
    "verify_cert",
]

CA_DAYS = 3650
HOST_CERT_DAYS = 5 * 365
# A certificate is valid from a little before it was made: the hosts' clocks differ.
_BACKDATE = timedelta(minutes=5)


class PkiError(ValueError):
    """A certificate, key or join message is not acceptable; the message says why."""


@dataclass(frozen=True)
class CertKey:
    """A PEM certificate and its PEM private key (unencrypted: keep the key in a 0600 file)."""

    cert_pem: bytes
    key_pem: bytes


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption(),
    )


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def load_cert(pem: bytes | str, what: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise PkiError(f"{what}: not a PEM certificate ({exc})") from None


def fingerprint(cert: bytes | str | x509.Certificate) -> str:
    """``sha256:<hex>`` of the certificate's public key (SubjectPublicKeyInfo, DER)."""
    c = cert if isinstance(cert, x509.Certificate) else load_cert(cert)
    spki = c.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


class Authority:
    """A certificate authority that can sign certificate requests."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    def key_pem(self, password: bytes | None = None) -> bytes:
        """The private key as PKCS#8 PEM, encrypted with ``password`` when given."""
        return _key_pem(self.key, password)

    @classmethod
    def load(cls, cert_pem: bytes | str, key_pem: bytes | str, password: bytes | None) -> Authority:
        """The authority from its PEMs; PkiError when the key is not the certificate's or the
        password does not open it."""
        cert = load_cert(cert_pem, "CA certificate")
        raw = key_pem.encode() if isinstance(key_pem, str) else key_pem
        try:
            key = serialization.load_pem_private_key(raw, password=password)
        except (ValueError, TypeError) as exc:
            raise PkiError(
                f"the CA key cannot be opened ({exc}): this server's pki_secret does not match "
                "the cluster's; rejoin this host"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key().public_numbers() != (
            cert.public_key().public_numbers()  # type: ignore[union-attr]
        ):
            raise PkiError("the CA key does not belong to the CA certificate")
        return cls(cert, key)

    def sign(
        self,
        csr_pem: bytes | str,
        *,
        name: str,
        ips: list[str] | tuple[str, ...] = (),
        days: int = HOST_CERT_DAYS,
        now: datetime | None = None,
    ) -> bytes:
        """A host certificate for ``name`` over the request's public key (PEM).

        The names and addresses come from the caller, not from the request: a host cannot ask
        for a name it was not given. PkiError when the request is malformed or its signature
        does not hold."""
        raw = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        try:
            csr = x509.load_pem_x509_csr(raw)
        except ValueError as exc:
            raise PkiError(f"not a PEM certificate request ({exc})") from None
        if not csr.is_signature_valid:
            raise PkiError("the certificate request's signature does not hold")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise PkiError("the certificate request must carry an EC P-256 key")
        start = _now(now) - _BACKDATE
        sans: list[x509.GeneralName] = [x509.DNSName(name)]
        for ip in dict.fromkeys(_with_loopback_source(ips)):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError:
                sans.append(x509.DNSName(ip))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=False,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        name: str,
        *,
        ips: list[str] | tuple[str, ...] = (),
        days: int = HOST_CERT_DAYS,
        now: datetime | None = None,
    ) -> CertKey:
        """A new key and its certificate, both made here (the bootstrap server's own)."""
        key = new_key()
        cert = self.sign(make_csr(key, name), name=name, ips=ips, days=days, now=now)
        return CertKey(cert, _key_pem(key))


def _with_loopback_source(ips: list[str] | tuple[str, ...]) -> list[str]:
    """``ips``, plus 127.0.0.1 when one is another loopback address: the kernel gives
    connections over loopback the source 127.0.0.1, and etcd checks a peer's source address
    against its certificate (hosts on 127.0.0.x, as in tests, would be refused otherwise)."""
    out = list(ips)
    for ip in ips:
        try:
            if ipaddress.ip_address(ip).is_loopback and ip != "127.0.0.1":
                out.append("127.0.0.1")
        except ValueError:
            continue
    return out


def new_authority(
    common_name: str, *, days: int = CA_DAYS, now: datetime | None = None
) -> Authority:
    """A new self-signed CA."""
    key = new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "corral"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    start = _now(now) - _BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    """A PEM certificate request for ``name`` signed with ``key``."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return _key_pem(key)


def verify_cert(
    cert_pem: bytes | str,
    ca_pem: bytes | str,
    *,
    key_pem: bytes | None = None,
    now: datetime | None = None,
) -> x509.Certificate:
    """Check that ``cert_pem`` was issued by ``ca_pem``, is valid now and (when given) belongs
    to ``key_pem``; returns it. PkiError naming what fails."""
    cert = load_cert(cert_pem)
    ca = load_cert(ca_pem, "CA certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(
            f"the certificate of {_cn(cert)!r} was not issued by the CA {fingerprint(ca)} "
            "(a certificate of another cluster?)"
        ) from None
    at = _now(now)
    for c, what in ((ca, "the CA certificate"), (cert, f"the certificate of {_cn(cert)!r}")):
        if at < c.not_valid_before_utc:
            raise PkiError(f"{what} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M}Z")
        if at > c.not_valid_after_utc:
            raise PkiError(f"{what} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M}Z")
    if key_pem is not None:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise PkiError(f"the certificate of {_cn(cert)!r} is not for this host's key")
    return cert


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else "?"


def cert_names(cert_pem: bytes | str) -> tuple[str, list[str]]:
    """The certificate's common name and its subject alternative names."""
    cert = load_cert(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        alt = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        alt += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        alt = []
    return _cn(cert), alt


# -- the join ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinToken:
    """A join token as the user types it: ``<id>.<secret>[.<CA fingerprint hex>]``."""

    id: str
    secret: str
    ca_fingerprint: str  # "sha256:<hex>", or "" when the token pins no CA

    @property
    def secret_hash(self) -> str:
        """What the cluster stores for the token: SHA-256 of the secret, hex."""
        return hashlib.sha256(self.secret.encode()).hexdigest()


def parse_token(text: str) -> JoinToken:
    """Split a token; a malformed one still parses (the cluster refuses it, like any bad one),
    except a CA fingerprint that is not 64 hex digits."""
    token_id, _, rest = text.strip().partition(".")
    secret, _, pin = rest.partition(".")
    if pin:
        pin = pin.lower().removeprefix("sha256:")
        if len(pin) != 64 or any(ch not in "0123456789abcdef" for ch in pin):
            raise PkiError(
                "--token: its third part must be the CA fingerprint, 64 hex digits; copy the "
                "whole token `corral token create` printed"
            )
        pin = "sha256:" + pin
    return JoinToken(token_id, secret, pin)


def _derive(secret_hash: str, purpose: bytes) -> bytes:
    """A key for ``purpose`` from the token's stored hash (the key material both sides have)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"corral-join-v1", info=purpose).derive(
        secret_hash.encode()
    )


def canonical(body: dict[str, Any]) -> bytes:
    """The bytes a join proof covers: the request without its proof, as sorted compact JSON."""
    rest = {k: v for k, v in body.items() if k != "proof"}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def join_proof(secret_hash: str, body: dict[str, Any]) -> str:
    """HMAC-SHA256 of the request under a key only the token's holder and the cluster know."""
    return hmac.new(_derive(secret_hash, b"proof"), canonical(body), hashlib.sha256).hexdigest()


def seal_context(name: str, ca_fingerprint: str) -> bytes:
    """What the sealed part of a join answer is bound to: the host and the CA it was given."""
    return f"corral-join\n{name}\n{ca_fingerprint}".encode()


def seal(secret_hash: str, data: dict[str, Any], context: bytes) -> str:
    """``data`` encrypted and authenticated for the token's holder (base64url)."""
    nonce = os.urandom(12)
    sealed = AESGCM(_derive(secret_hash, b"seal")).encrypt(
        nonce, json.dumps(data).encode(), context
    )
    return base64.urlsafe_b64encode(nonce + sealed).decode()


def unseal(secret_hash: str, sealed: str, context: bytes) -> dict[str, Any]:
    """Open what ``seal`` made; PkiError when it was not sealed with this token (an impostor)."""
    try:
        raw = base64.urlsafe_b64decode(sealed.encode())
        plain = AESGCM(_derive(secret_hash, b"seal")).decrypt(raw[:12], raw[12:], context)
        data = json.loads(plain)
    except (ValueError, InvalidTag):
        raise PkiError(
            "the join answer was not sealed with this token: whatever answered does not know "
            "the token (not the cluster that issued it)"
        ) from None
    if not isinstance(data, dict):
        raise PkiError("the join answer's sealed part is not an object")
    return data
