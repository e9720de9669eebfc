"""The cluster PKI: issuing, verifying, expiry, fingerprints, and the join's proof and seal."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from corral.cluster import pki


@pytest.fixture(scope="module")
def ca() -> pki.Authority:
    return pki.new_authority("test CA")


def test_a_signed_request_gives_a_certificate_for_the_host_and_its_addresses(
    ca: pki.Authority,
) -> None:
    key = pki.new_key()
    cert = ca.sign(pki.make_csr(key, "n2"), name="n2", ips=["10.0.0.2", "10.0.0.2"])
    verified = pki.verify_cert(cert, ca.cert_pem, key_pem=pki.key_pem(key))
    cn, alt = pki.cert_names(cert)
    assert cn == "n2"
    assert alt == ["n2", "10.0.0.2"]
    usage = verified.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {u.dotted_string for u in usage} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    assert not verified.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_the_name_comes_from_the_signer_not_from_the_request(ca: pki.Authority) -> None:
    cert = ca.sign(pki.make_csr(pki.new_key(), "n1-impostor"), name="c7")
    assert pki.cert_names(cert)[0] == "c7"


def test_loopback_hosts_also_name_127_0_0_1(ca: pki.Authority) -> None:
    cert = ca.issue("n3", ips=["127.0.0.3"])
    _, alt = pki.cert_names(cert.cert_pem)
    assert [a for a in alt if a[0].isdigit()] == ["127.0.0.3", "127.0.0.1"]
    assert all(ipaddress.ip_address(a) for a in alt if a[0].isdigit())


def test_a_certificate_of_another_ca_is_refused_naming_the_ca(ca: pki.Authority) -> None:
    other = pki.new_authority("other CA")
    foreign = other.issue("n9")
    with pytest.raises(pki.PkiError, match=r"not issued by the CA sha256:[0-9a-f]{64}"):
        pki.verify_cert(foreign.cert_pem, ca.cert_pem)


def test_a_certificate_for_another_key_is_refused(ca: pki.Authority) -> None:
    cert = ca.issue("n2")
    with pytest.raises(pki.PkiError, match="not for this host's key"):
        pki.verify_cert(cert.cert_pem, ca.cert_pem, key_pem=pki.key_pem(pki.new_key()))


def test_expiry_and_not_yet_valid_are_refused_with_the_date(ca: pki.Authority) -> None:
    cert = ca.issue("n2", days=1)
    now = datetime.now(UTC)
    pki.verify_cert(cert.cert_pem, ca.cert_pem, now=now + timedelta(hours=23))
    with pytest.raises(pki.PkiError, match=r"certificate of 'n2' expired on \d{4}-\d\d-\d\d"):
        pki.verify_cert(cert.cert_pem, ca.cert_pem, now=now + timedelta(days=2))
    with pytest.raises(pki.PkiError, match="not valid before"):
        pki.verify_cert(cert.cert_pem, ca.cert_pem, now=now - timedelta(hours=1))
    # An expired CA makes every certificate it issued unacceptable.
    old_ca = pki.new_authority("old", days=1, now=now - timedelta(days=3))
    old = old_ca.issue("n2", now=now - timedelta(days=3))
    with pytest.raises(pki.PkiError, match="the CA certificate expired"):
        pki.verify_cert(old.cert_pem, old_ca.cert_pem)


def test_the_fingerprint_names_the_ca_key_and_survives_reissue(ca: pki.Authority) -> None:
    fp = pki.fingerprint(ca.cert_pem)
    assert fp == ca.fingerprint
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    # The same key under a new certificate keeps its fingerprint; another key does not.
    again = pki.new_authority("test CA")
    reissued = pki.Authority(ca.cert, ca.key)
    assert reissued.fingerprint == fp
    assert again.fingerprint != fp


def test_the_ca_key_is_stored_encrypted_and_opens_only_with_the_secret(
    ca: pki.Authority,
) -> None:
    stored = ca.key_pem(b"s3cret")
    assert b"ENCRYPTED PRIVATE KEY" in stored
    loaded = pki.Authority.load(ca.cert_pem, stored, b"s3cret")
    assert loaded.fingerprint == ca.fingerprint
    with pytest.raises(pki.PkiError, match="pki_secret does not match"):
        pki.Authority.load(ca.cert_pem, stored, b"wrong")
    other = pki.new_authority("x")
    with pytest.raises(pki.PkiError, match="does not belong to the CA certificate"):
        pki.Authority.load(ca.cert_pem, other.key_pem(b"s3cret"), b"s3cret")


def test_a_malformed_or_forged_request_is_refused(ca: pki.Authority) -> None:
    with pytest.raises(pki.PkiError, match="not a PEM certificate request"):
        ca.sign(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", name="n2")
    good = pki.make_csr(pki.new_key(), "n2").decode()
    lines = good.splitlines()
    body = lines[1:-1]
    # Flip one character inside the signature (near the end of the DER).
    last = body[-1]
    body[-1] = last[:-3] + ("A" if last[-3] != "A" else "B") + last[-2:]
    forged = "\n".join([lines[0], *body, lines[-1]])
    with pytest.raises(pki.PkiError):
        ca.sign(forged, name="n2")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ab12.s3cr-et_x", pki.JoinToken("ab12", "s3cr-et_x", "")),
        ("ab12.sec." + "A" * 64, pki.JoinToken("ab12", "sec", "sha256:" + "a" * 64)),
        ("ab12.sec.sha256:" + "b" * 64, pki.JoinToken("ab12", "sec", "sha256:" + "b" * 64)),
        ("garbage", pki.JoinToken("garbage", "", "")),
    ],
)
def test_tokens_parse(text: str, expected: pki.JoinToken) -> None:
    assert pki.parse_token(text) == expected


def test_a_token_with_a_bad_fingerprint_part_says_what_to_copy() -> None:
    with pytest.raises(pki.PkiError, match="64 hex digits"):
        pki.parse_token("ab12.sec.nothex")


def test_the_proof_covers_the_whole_request_but_not_itself() -> None:
    token = pki.parse_token("ab12.sec")
    body = {"name": "n2", "csr": "PEM", "role": "server"}
    proof = pki.join_proof(token.secret_hash, body)
    assert pki.join_proof(token.secret_hash, {**body, "proof": proof}) == proof
    assert pki.join_proof(token.secret_hash, {**body, "name": "n3"}) != proof
    assert pki.join_proof(pki.parse_token("ab12.other").secret_hash, body) != proof
    assert "sec" not in proof


def test_sealed_secrets_open_only_with_the_token_and_context() -> None:
    token = pki.parse_token("ab12.sec")
    context = pki.seal_context("n2", "sha256:" + "a" * 64)
    sealed = pki.seal(token.secret_hash, {"gossip_key": "k"}, context)
    assert pki.unseal(token.secret_hash, sealed, context) == {"gossip_key": "k"}
    with pytest.raises(pki.PkiError, match="does not know the token"):
        pki.unseal(pki.parse_token("ab12.nope").secret_hash, sealed, context)
    with pytest.raises(pki.PkiError, match="does not know the token"):
        pki.unseal(token.secret_hash, sealed, pki.seal_context("n2", "sha256:" + "b" * 64))
