"""The cluster CA at work: etcd and the gRPC NodeService speak only TLS with certificates of
the cluster's CAs, join tokens pin the CA, and data dirs from before TLS are refused clearly.

Real agent processes, real etcd members.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from corral.agent.remote import RemoteNodeService, client_credentials
from corral.cluster import pki
from corral.errors import PreconditionFailed, Unavailable
from corral.state import Store
from corral.state.store import EtcdTls
from tests.integration.harness import AgentProcess, node_states, token, wait_for

pytestmark = pytest.mark.integration

MakeAgent = Callable[..., AgentProcess]
FAST = ["--lease-ttl-s", "6", "--leader-ttl-s", "4", "--node-down-after-s", "20"]


def pem(agent: AgentProcess, name: str) -> bytes:
    return (agent.data_dir / "pki" / name).read_bytes()


def cli(agent: AgentProcess, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "corral", "--addr", agent.url, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def refused_join(agent: AgentProcess) -> subprocess.CompletedProcess[str]:
    agent.data_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        agent.command(bootstrap=False), capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def trio(make_agent: MakeAgent) -> Iterator[dict[str, AgentProcess]]:
    """n1 (bootstrap), n2 (server, joined), c1 (compute-only, joined)."""
    n1 = make_agent("n1", bind="127.0.0.1", extra_args=FAST).start()
    t = token(n1, uses=5)
    n2 = make_agent("n2", bind="127.0.0.2", extra_args=[*FAST, *n1.join_args(t)])
    n2.start(bootstrap=False, timeout_s=90)
    c1 = make_agent("c1", bind="127.0.0.4", extra_args=[*FAST, "--no-server", *n1.join_args(t)])
    c1.start(bootstrap=False)
    wait_for(lambda: node_states(n1) == dict.fromkeys(["c1", "n1", "n2"], "ready"), 60, "3 ready")
    yield {"n1": n1, "n2": n2, "c1": c1}


def test_every_host_holds_certificates_of_the_one_cluster_ca(
    trio: dict[str, AgentProcess],
) -> None:
    n1, n2, c1 = trio["n1"], trio["n2"], trio["c1"]
    ca = pem(n1, "ca.crt")
    info = httpx.get(n1.url + "/api/v1/cluster", timeout=10).json()
    assert info["ca_fingerprint"] == pki.fingerprint(ca)
    for host in (n2, c1):
        assert pem(host, "ca.crt") == ca
        pki.verify_cert(pem(host, "host.crt"), ca, key_pem=pem(host, "host.key"))
        assert pki.cert_names(pem(host, "host.crt"))[0] == host.name
        assert (host.data_dir / "pki" / "host.key").stat().st_mode & 0o077 == 0
    # Only servers get an etcd certificate, from the etcd CA (which etcd alone trusts).
    pki.verify_cert(pem(n2, "etcd.crt"), pem(n1, "etcd-ca.crt"), key_pem=pem(n2, "etcd.key"))
    assert not (c1.data_dir / "pki" / "etcd.key").exists()
    with pytest.raises(pki.PkiError):
        pki.verify_cert(pem(c1, "host.crt"), pem(n1, "etcd-ca.crt"))
    # The join sealed the gossip key: compute hosts hold it but not the CA keys' secret.
    c1_identity = json.loads((c1.data_dir / "cluster.json").read_text())
    n2_identity = json.loads((n2.data_dir / "cluster.json").read_text())
    assert c1_identity["gossip_key"] and not c1_identity["pki_secret"]
    assert (
        n2_identity["pki_secret"]
        == json.loads((n1.data_dir / "cluster.json").read_text())["pki_secret"]
    )
    members = {m["name"]: m for m in info["members"]}
    assert all(u.startswith("https://") for m in members.values() for u in m["peer_urls"])
    # Once promoted, the joined server talks to its own etcd member first.
    wait_for(
        lambda: "etcd member promoted: using it first" in n2.log_path.read_text(),
        60,
        "n2 to prefer its own etcd member",
    )


async def test_etcd_refuses_clients_without_a_certificate_of_its_ca(
    trio: dict[str, AgentProcess],
) -> None:
    n1, c1 = trio["n1"], trio["c1"]
    url = f"https://{n1.bind}:{n1.etcd_client_port}"
    ca = pem(n1, "etcd-ca.crt")
    # With n1's own etcd certificate: it answers.
    good = Store([url], timeout_s=3, tls=EtcdTls(ca, pem(n1, "etcd.crt"), pem(n1, "etcd.key")))
    try:
        assert await good.get("/corral/v1/cluster") is not None
    finally:
        await good.close()
    attempts = {
        "plaintext": Store([f"http://{n1.bind}:{n1.etcd_client_port}"], timeout_s=3),
        # A compute host's certificate is of the cluster CA, not the etcd CA: no way in.
        "compute host's certificate": Store(
            [url], timeout_s=3, tls=EtcdTls(ca, pem(c1, "host.crt"), pem(c1, "host.key"))
        ),
    }
    other = pki.new_authority("another cluster's etcd CA").issue("n1", ips=[n1.bind])
    attempts["another CA's certificate"] = Store(
        [url], timeout_s=3, tls=EtcdTls(ca, other.cert_pem, other.key_pem)
    )
    for why, store in attempts.items():
        try:
            with pytest.raises(Unavailable):
                await asyncio.wait_for(store.get("/corral/v1/cluster"), 10)
        except BaseException:
            print("etcd answered a client with", why)
            raise
        finally:
            await store.close()
    # And the HTTP side (/health) likewise wants a certificate.
    async with httpx.AsyncClient(timeout=3) as plain:
        with pytest.raises(httpx.HTTPError):
            r = await plain.get(f"http://{n1.bind}:{n1.etcd_client_port}/health")
            r.raise_for_status()


async def test_the_node_service_refuses_other_cas_and_hosts_acting_for_others(
    trio: dict[str, AgentProcess],
) -> None:
    n1, c1 = trio["n1"], trio["c1"]
    target = f"{n1.bind}:{n1.grpc_port}"
    ca = pem(n1, "ca.crt")

    async def register(creds: object, node: str) -> None:
        # An empty report: harmless, but only a host the server accepts gets it through.
        client = RemoteNodeService([target], timeout_s=3, credentials=creds)  # type: ignore[arg-type]
        try:
            await client.report(node, [])
        finally:
            await client.close()

    # c1's own certificate may act for c1.
    mine = client_credentials(ca, pem(c1, "host.crt"), pem(c1, "host.key"))
    await register(mine, "c1")
    # ... but not for n2.
    with pytest.raises(PreconditionFailed, match="certificate is c1's; it cannot act for node"):
        await register(mine, "n2")
    # A host with a certificate of another cluster's CA is turned away at the handshake.
    foreign = pki.new_authority("another cluster").issue("c1", ips=[c1.bind])
    with pytest.raises(Unavailable, match="no server answered Report"):
        await register(client_credentials(ca, foreign.cert_pem, foreign.key_pem), "c1")
    # So is one that does not trust this cluster's CA (it talks to the wrong cluster).
    other_ca = pki.new_authority("another cluster").cert_pem
    with pytest.raises(Unavailable):
        await register(client_credentials(other_ca, pem(c1, "host.crt"), pem(c1, "host.key")), "c1")


def test_cluster_status_shows_each_members_replication_lag(
    trio: dict[str, AgentProcess],
) -> None:
    n1 = trio["n1"]
    info = httpx.get(n1.url + "/api/v1/cluster", timeout=10).json()
    members = {m["name"]: m for m in info["members"]}
    assert set(members) == {"n1", "n2"}
    for m in members.values():
        assert isinstance(m["raft_index"], int) and m["raft_index"] > 0
        assert isinstance(m["lag"], int) and m["lag"] >= 0
    leader = next(m for m in members.values() if m["is_leader"])
    assert leader["lag"] == 0
    table = cli(n1, "cluster", "status")
    header = next(line for line in table.splitlines() if "MEMBER" in line)
    assert "LAG" in header
    assert info["ca_fingerprint"] in table
    for name in ("n1", "n2"):
        row = next(line for line in table.splitlines() if line.strip().startswith(name + " "))
        column = header.index("LAG")
        assert row[column:].split()[0].isdigit(), row


def test_a_token_pinning_another_clusters_ca_is_refused_before_anything_changes(
    make_agent: MakeAgent,
) -> None:
    n1 = make_agent("n1", bind="127.0.0.1").start()
    m1 = make_agent("m1", bind="127.0.0.3").start()
    good = token(n1, uses=1)
    token_id, secret, n1_pin = good.split(".")
    assert "sha256:" + n1_pin == httpx.get(n1.url + "/api/v1/cluster").json()["ca_fingerprint"]
    m1_pin = pki.fingerprint(pem(m1, "ca.crt")).removeprefix("sha256:")
    joiner = make_agent(
        "x1",
        bind="127.0.0.5",
        extra_args=["--no-server", *n1.join_args(f"{token_id}.{secret}.{m1_pin}")],
    )
    result = refused_join(joiner)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "it is a token of another cluster" in last, result.stderr
    assert m1_pin in last and n1_pin in last
    assert not (joiner.data_dir / "cluster.json").exists()
    # Nothing happened on n1: no node, the single-use token is still unused.
    assert sorted(node_states(n1)) == ["n1"]
    listed = httpx.get(f"{n1.url}/api/v1/tokens/{token_id}").json()
    assert listed["status"]["uses_left"] == 1
    # The right pin joins.
    ok = make_agent("x2", bind="127.0.0.6", extra_args=["--no-server", *n1.join_args(good)])
    ok.start(bootstrap=False)
    wait_for(lambda: node_states(n1).get("x2") == "ready", 30, "x2 ready")


def test_data_dirs_from_before_tls_are_refused_with_what_to_do(tmp_path: Path) -> None:
    with_identity = AgentProcess(tmp_path / "old1", name="old1")
    with_identity.data_dir.mkdir(parents=True)
    (with_identity.data_dir / "cluster.json").write_text(
        json.dumps({"cluster_id": "c-old", "role": "server", "gossip_key": "k"})
    )
    etcd_only = AgentProcess(tmp_path / "old2", name="old2")
    (etcd_only.data_dir / "etcd" / "member").mkdir(parents=True)
    for agent in (with_identity, etcd_only):
        result = subprocess.run(
            agent.command(bootstrap=False), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert "was made by a corral without TLS" in last, result.stderr
        assert "new --data-dir" in last
        assert "Traceback" not in result.stderr
