"""Pools, volumes and images through a real agent (fake driver: the files are real, qemu-img
makes them; only the guests are simulated). QEMU guests using them: tests/e2e/."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.harness import AgentProcess, node_states, wait_for

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


def _problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = r.json()
    return body


def _img(path: Path, *extra: str, size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), size], check=True)
    return path


def _info(path: str) -> dict[str, Any]:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", path], check=True, capture_output=True
    ).stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


def _upload(c: httpx.Client, name: str, file: str, path: Path) -> httpx.Response:
    data = path.read_bytes()
    return c.put(
        f"/api/v1/images/{name}/files/{file}",
        content=data,
        headers={"X-Content-SHA256": hashlib.sha256(data).hexdigest()},
    )


def _names(c: httpx.Client, kind: str) -> list[str]:
    return [o["name"] for o in c.get(f"/api/v1/{kind}").json()["items"]]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Any:
    a = AgentProcess(tmp_path_factory.mktemp("storage") / "n1").start()
    yield a
    a.stop()


def test_the_local_pool_exists_and_volumes_are_made_on_their_host(
    agent: AgentProcess,
) -> None:
    with agent.client() as c:
        pools = c.get("/api/v1/pools").json()["items"]
        assert [(p["name"], p["spec"]["driver"], p["spec"]["shared"]) for p in pools] == [
            ("local", "dir", False)
        ]
        # Its capacity on the host is in the host's inventory.
        usage = c.get("/api/v1/nodes/n1").json()["status"]["inventory"]["pools"]["local"]
        assert usage["path"] == str(agent.data_dir / "pools" / "local")
        assert usage["total_bytes"] >= usage["free_bytes"] > 0
        # Without a host: recorded, made on the host of the first VM that uses it.
        r = c.post("/api/v1/volumes", json={"name": "later", "size_gib": 1})
        assert r.status_code == 201, r.text
        assert r.json()["status"]["state"] == "pending"
        # With a host: the file exists when the call returns.
        wait_for(lambda: node_states(agent) == {"n1": "ready"}, 20, "n1 to be ready")
        r = c.post("/api/v1/volumes", json={"name": "now-1", "size_gib": 2, "node": "n1"})
        assert r.status_code == 201, r.text
        vol = r.json()
        assert vol["status"]["state"] == "ready" and vol["status"]["node"] == "n1"
        path = vol["status"]["path"]
        assert path.startswith(str(agent.data_dir / "pools" / "local"))
        info = _info(path)
        assert info["format"] == "qcow2" and info["virtual-size"] == 2 * 1024**3

        # Grow only: shrinking is refused with the rule, growing changes the file.
        p = _problem(c.patch("/api/v1/volumes/now-1", json={"size_gib": 1}), 422)
        assert p["errors"][0]["rule"] == "grow-only"
        r = c.patch("/api/v1/volumes/now-1", json={"size_gib": 3})
        assert r.status_code == 200, r.text
        assert _info(path)["virtual-size"] == 3 * 1024**3

        r = c.delete("/api/v1/volumes/now-1", params={"wait": "true", "timeout": 30})
        assert r.status_code == 200, r.text
        assert not Path(path).exists()
        assert "now-1" not in _names(c, "volumes")


def test_an_image_is_uploaded_checked_and_cloned_into_vm_disks(
    agent: AgentProcess, tmp_path: Path
) -> None:
    disk = _img(tmp_path / "base.qcow2")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 1M", str(disk)],
        check=True,
        capture_output=True,
    )
    with agent.client() as c:
        r = c.post("/api/v1/images", json={"name": "base"})
        assert r.status_code == 201, r.text
        assert r.json()["status"]["state"] == "uploading"
        r = _upload(c, "base", "disk", disk)
        assert r.status_code == 200, r.text
        image = r.json()
        assert image["status"]["state"] == "ready"
        stored = image["status"]["files"]["disk"]
        assert stored["format"] == "qcow2"
        assert stored["sha256"] == hashlib.sha256(disk.read_bytes()).hexdigest()
        assert stored["virtual_size_bytes"] == 64 * 1024**2

        # A VM from the image: its boot volume is a linked clone on the VM's host.
        r = c.post(
            "/api/v1/vms",
            params={"wait": "true", "timeout": 30},
            json={"name": "cl-1", "image": "base", "disk_gib": 1},
        )
        assert r.status_code == 200, r.text
        assert r.json()["task"]["status"]["state"] == "succeeded"
        vm = r.json()["object"]
        assert vm["spec"]["disks"] == [{"volume": "cl-1-disk0"}]

        def ready() -> dict[str, Any] | None:
            v = c.get("/api/v1/volumes/cl-1-disk0").json()
            return v if v["status"]["state"] == "ready" else None

        vol = wait_for(ready, 20, "the boot volume to be reported ready")
        assert vol["status"]["node"] == "n1" and vol["status"]["attached_to"] == "cl-1"
        info = _info(vol["status"]["path"])
        assert info["virtual-size"] == 1024**3
        backing = info["full-backing-filename"]
        assert backing.startswith(str(agent.data_dir / "images"))
        assert info["backing-filename-format"] == "qcow2"

        # Attach the pending volume, then detach it (the fake driver records it).
        r = c.post(
            "/api/v1/vms/cl-1/disks",
            params={"wait": "true", "timeout": 30},
            json={"volume": "later"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["task"]["status"]["state"] == "succeeded", r.json()["task"]
        later = wait_for(
            lambda: (
                (v := c.get("/api/v1/volumes/later").json())["status"]["state"] == "ready" and v
            ),
            20,
            "the attached volume to be made",
        )
        assert later["status"]["attached_to"] == "cl-1"
        # In use: the image and the attached volume cannot go.
        p = _problem(c.delete("/api/v1/images/base"), 409)
        assert "cl-1" in p["detail"]
        p = _problem(c.delete("/api/v1/volumes/later"), 409)
        assert "corral vm disk detach cl-1 later" in p["detail"]
        r = c.delete("/api/v1/vms/cl-1/disks/later", params={"wait": "true", "timeout": 30})
        assert r.status_code == 200, r.text
        assert c.get("/api/v1/volumes/later").json()["status"]["attached_to"] is None

        # Deleting the VM with its disks removes the boot volume and its file.
        boot_path = Path(vol["status"]["path"])
        r = c.delete("/api/v1/vms/cl-1", params={"with_disks": "true", "wait": "true"})
        assert r.status_code == 200, r.text
        wait_for(lambda: "cl-1-disk0" not in _names(c, "volumes"), 30, "the boot volume to go")
        assert not boot_path.exists()
        assert "later" in _names(c, "volumes")  # not the VM's any more: kept
        r = c.delete("/api/v1/images/base")
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("extra", "rule"),
    [
        (("-b", "/etc/passwd", "-F", "raw"), "no-backing-file"),
        (("-o", "data_file=/tmp/corral-test-data-file"), "no-data-file"),
    ],
)
def test_images_pointing_outside_themselves_are_refused(
    agent: AgentProcess, tmp_path: Path, extra: tuple[str, ...], rule: str
) -> None:
    bad = _img(tmp_path / "bad.qcow2", *extra)
    with agent.client() as c:
        assert c.post("/api/v1/images", json={"name": "evil"}).status_code == 201
        p = _problem(_upload(c, "evil", "disk", bad), 422)
        assert p["errors"][0]["field"] == "disk" and p["errors"][0]["rule"] == rule
        assert "qemu-img convert" in p["detail"]
        image = c.get("/api/v1/images/evil").json()
        assert image["status"]["state"] == "uploading" and image["status"]["files"] == {}
        p = _problem(c.post("/api/v1/vms", json={"name": "ev-1", "image": "evil"}), 422)
        assert p["errors"][0]["rule"] == "ready"
        assert c.delete("/api/v1/images/evil").status_code == 200
    Path("/tmp/corral-test-data-file").unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        (
            {"name": "u1", "source": {"url": "https://127.0.0.1/x.qcow2", "sha256": "a" * 64}},
            "source.url",
            "public-address",
        ),
        (
            {"name": "u2", "source": {"url": "https://169.254.169.254/latest", "sha256": "a" * 64}},
            "source.url",
            "public-address",
        ),
        (
            {"name": "u3", "source": {"url": "http://example.com/x.qcow2", "sha256": "a" * 64}},
            "source.url",
            "https",
        ),
        (
            {"name": "u4", "source": {"url": "https://example.com/x", "sha256": "nope"}},
            "source.sha256",
            "format",
        ),
        ({"name": "u5,file=/etc/passwd"}, "name", "format"),
    ],
)
def test_bad_image_sources_are_refused_and_nothing_is_created(
    agent: AgentProcess, body: dict[str, Any], field: str, rule: str
) -> None:
    with agent.client() as c:
        p = _problem(c.post("/api/v1/images", json=body), 422)
        assert any(e["field"] == field and e["rule"] == rule for e in p["errors"]), p
        assert not [n for n in _names(c, "images") if n.startswith("u")]


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ({"name": "d1", "image": "nonesuch"}, "image", "exists"),
        ({"name": "d2", "disks": [{"volume": "nonesuch"}]}, "disks.0.volume", "exists"),
        ({"name": "d3,file=x"}, "name", "format"),
        ({"name": "d4", "image": "nonesuch", "disk_gib": 0}, "disk_gib", "ge"),
        ({"name": "d5", "disk_gib": 2048}, "disk_gib", "image"),
    ],
)
def test_vms_with_bad_disks_are_refused_and_nothing_is_created(
    agent: AgentProcess, body: dict[str, Any], field: str, rule: str
) -> None:
    with agent.client() as c:
        p = _problem(c.post("/api/v1/vms", json=body), 422)
        assert any(e["field"] == field and e["rule"] == rule for e in p["errors"]), p
        assert not [n for n in _names(c, "vms") if n.startswith("d")]
        assert not [n for n in _names(c, "volumes") if n.startswith("d")]


@pytest.mark.parametrize(
    ("size", "rule"), [(0, "ge"), (2048, "host-capacity"), (64 * 1024 + 1, "le")]
)
def test_volume_sizes_out_of_reach_are_refused(agent: AgentProcess, size: int, rule: str) -> None:
    with agent.client() as c:
        p = _problem(c.post("/api/v1/volumes", json={"name": "sz", "size_gib": size}), 422)
        assert any(e["field"] == "size_gib" and e["rule"] == rule for e in p["errors"]), p
        assert "sz" not in _names(c, "volumes")
