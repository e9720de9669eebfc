"""Crashes, restarts and etcd failures: nothing acknowledged is lost, nothing is doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.harness import AgentProcess, free_port

MakeAgent = Callable[..., AgentProcess]

pytestmark = pytest.mark.integration


def _wait(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _all(c: httpx.Client, kind: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if cursor:
            params["cursor"] = cursor
        page = c.get(f"/api/v1/{kind}", params=params).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items


def test_sigkill_during_100_concurrent_creates_loses_nothing(make_agent: MakeAgent) -> None:
    agent = make_agent().start()
    keys = {f"crash-{i:03d}": str(uuid.uuid4()) for i in range(100)}
    acked: dict[str, str] = {}
    lock = threading.Lock()
    go = threading.Event()

    def create(name: str) -> None:
        go.wait()
        try:
            r = httpx.post(
                agent.url + "/api/v1/vms",
                timeout=10,
                json={"name": name, "memory_mib": 64},
                headers={"Idempotency-Key": keys[name]},
            )
        except httpx.HTTPError:
            return
        if 200 <= r.status_code < 300:
            with lock:
                acked[name] = r.json()["object"]["id"]

    threads = [threading.Thread(target=create, args=(n,)) for n in keys]
    for t in threads:
        t.start()
    go.set()
    _wait(lambda: len(acked) >= 20, 30, "the first 20 creates")
    agent.kill()
    for t in threads:
        t.join(15)
    assert 20 <= len(acked) <= 100

    agent.start(bootstrap=False)
    with agent.client() as c:
        vms = {v["name"]: v for v in _all(c, "vms")}
        for name, vm_id in acked.items():
            assert name in vms, f"{name} was acknowledged but is gone after the crash"
            assert vms[name]["id"] == vm_id
        # Clients retry what they never heard back about, with the same keys: no doubles.
        for name, key in keys.items():
            r = c.post(
                "/api/v1/vms",
                json={"name": name, "memory_mib": 64},
                headers={"Idempotency-Key": key},
            )
            assert r.status_code in (200, 202), r.text
            if name in acked:
                assert r.status_code == 200 and r.json()["object"]["id"] == acked[name]
        vms_after = _all(c, "vms")
        assert sorted(v["name"] for v in vms_after) == sorted(keys)
        assert len({v["id"] for v in vms_after}) == 100

        def settled() -> bool:
            tasks = _all(c, "tasks")
            return bool(tasks) and all(
                t["status"]["state"] in ("succeeded", "failed", "cancelled") for t in tasks
            )

        _wait(settled, 90, "every task to reach a final state")
        running = [v for v in _all(c, "vms") if v["status"]["state"] == "running"]
        assert len(running) == 100
    assert agent.stop() == 0


def test_restart_reattaches_running_vms_and_keeps_state(make_agent: MakeAgent) -> None:
    agent = make_agent().start()
    with agent.client() as c:
        r = c.post(
            "/api/v1/vms", params={"wait": "true"}, json={"name": "keep-1", "memory_mib": 64}
        )
        before = r.json()["object"]
        assert before["status"]["state"] == "running"
        task_id = r.json()["task"]["id"]
    assert agent.stop() == 0
    # A clean stop revokes the liveness lease and leaves no etcd behind.
    agent._wait_etcd_gone()

    agent.start(bootstrap=False)
    with agent.client() as c:
        after = c.get("/api/v1/vms/keep-1").json()
        assert after["id"] == before["id"]
        assert after["status"]["state"] == "running"
        assert after["status"]["started_at"] == before["status"]["started_at"], "VM was restarted"
        assert c.get(f"/api/v1/tasks/{task_id}").json()["status"]["state"] == "succeeded"
        node = _wait(
            lambda: (n := c.get("/api/v1/nodes/n1").json())["status"]["state"] == "ready" and n,
            20,
            "node ready",
        )
        assert node["status"]["allocated"]["vms"] == 1
    assert "recovered 1 vms (1 running)" in agent.log_path.read_text()
    agent.stop()


def test_etcd_death_is_survived(make_agent: MakeAgent) -> None:
    agent = make_agent().start()
    assert agent.proc is not None
    etcd_pid = int(
        subprocess.run(
            ["pgrep", "-P", str(agent.proc.pid), "-x", "etcd"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[0]
    )
    os.kill(etcd_pid, signal.SIGKILL)

    def not_ready() -> dict[str, Any] | None:
        try:
            r = httpx.get(agent.url + "/readyz", timeout=3)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 503 else None

    problem = _wait(not_ready, 20, "readyz to report the dead etcd")
    assert problem["type"].endswith("/unavailable")
    assert any("etcd" in reason or "store" in reason for reason in problem["reasons"])
    agent.wait_ready(60)
    with agent.client(timeout=90) as c:
        r = c.post(
            "/api/v1/vms", params={"wait": "true"}, json={"name": "after-1", "memory_mib": 64}
        )
        assert r.status_code == 200 and r.json()["task"]["status"]["state"] == "succeeded"
    assert "restarting in" in agent.log_path.read_text()
    assert agent.stop() == 0


def test_external_etcd(tmp_path: Path, make_agent: MakeAgent) -> None:
    client_port, peer_port = free_port(), free_port()
    etcd = subprocess.Popen(
        [
            "etcd",
            "--name",
            "ext",
            "--data-dir",
            str(tmp_path / "ext"),
            "--listen-client-urls",
            f"http://127.0.0.1:{client_port}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{client_port}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer_port}",
            "--initial-cluster",
            f"ext=http://127.0.0.1:{peer_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        agent = make_agent(
            extra_args=["--etcd-endpoints", f"http://127.0.0.1:{client_port}"]
        ).start()
        with agent.client() as c:
            r = c.post("/api/v1/vms", params={"wait": "true"}, json={"name": "ext-1"})
            assert r.json()["object"]["status"]["state"] == "running"
            members = c.get("/api/v1/cluster").json()["members"]
            assert [m["name"] for m in members] == ["ext"]
        assert not (tmp_path / "n1" / "etcd").exists()
        assert agent.stop() == 0
        assert etcd.poll() is None, "corral must not stop an etcd it does not own"
    finally:
        etcd.terminate()
        etcd.wait(10)


def test_agent_refuses_an_empty_data_dir_without_bootstrap(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "n1")
    agent.data_dir.mkdir(parents=True)
    result = subprocess.run(
        agent.command(bootstrap=False), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "pass --bootstrap" in result.stderr
