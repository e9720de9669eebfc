"""Agent settings: every field is a flag (``--http-port``), an environment variable
(``CORRAL_HTTP_PORT``) and a config-file key (``http_port`` in the TOML file given by
``--config``). Precedence: flag, then environment, then file, then the default.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.agent.drivers import DRIVERS

__all__ = ["AgentSettings", "SettingsError", "load_settings"]


class SettingsError(ValueError):
    """A setting has a bad value; the message names the flag, variable and key."""


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass
class AgentSettings:
    name: str = field(
        default_factory=socket.gethostname, metadata=_doc("this host's node name (a DNS label)")
    )
    data_dir: Path = field(
        default=Path(".corral"), metadata=_doc("where etcd data, driver state and logs live")
    )
    bind: str = field(
        default="127.0.0.1",
        metadata=_doc("address every listener binds to (API, etcd client and peer)"),
    )
    http_port: int = field(default=8700, metadata=_doc("REST API port"))
    etcd_client_port: int = field(default=8702, metadata=_doc("etcd client port"))
    etcd_peer_port: int = field(default=8703, metadata=_doc("etcd peer port"))
    etcd_endpoints: str = field(
        default="",
        metadata=_doc(
            "comma-separated URLs of an etcd cluster you run yourself; corral then starts none"
        ),
    )
    bootstrap: bool = field(
        default=False, metadata=_doc("create a new cluster in an empty data dir")
    )
    join: str = field(
        default="",
        metadata=_doc(
            "join the cluster through any of its hosts (host, host:port or URL of its API)"
        ),
    )
    token: str = field(default="", metadata=_doc("join token (from `corral token create`)"))
    no_server: bool = field(
        default=False,
        metadata=_doc(
            "compute-only host: runs VMs, keeps no state, talks to the servers over gRPC"
        ),
    )
    leave: bool = field(
        default=False,
        metadata=_doc("on shutdown, leave the cluster for good (its etcd member is removed)"),
    )
    grpc_port: int = field(default=8701, metadata=_doc("gRPC port (NodeService for compute hosts)"))
    gossip_port: int = field(default=8704, metadata=_doc("Serf gossip port on the bind address"))
    gossip_rpc_port: int = field(default=8705, metadata=_doc("Serf RPC port, on 127.0.0.1 only"))
    desired_voters: int = field(
        default=3,
        metadata=_doc(
            "etcd voters the cluster keeps (1, 3 or 5); used at bootstrap, later changed with "
            "`corral cluster set`"
        ),
    )
    server_dead_grace_s: float = field(
        default=300.0,
        metadata=_doc(
            "seconds a dead server keeps its etcd membership before it is replaced; used at "
            "bootstrap, later changed with `corral cluster set`"
        ),
    )
    driver: str = field(
        default="qemu",
        metadata=_doc("hypervisor driver: qemu (real guests) or fake (simulated, for tests)"),
    )
    labels: str = field(
        default="", metadata=_doc("node labels as k=v,k2=v2 (the --label flag may be repeated)")
    )
    lease_ttl_s: int = field(
        default=15, metadata=_doc("seconds a host may miss heartbeats before it is not-ready")
    )
    leader_ttl_s: int = field(
        default=5,
        metadata=_doc("seconds a dead leader keeps the leadership before another server takes it"),
    )
    node_down_after_s: float = field(
        default=60.0,
        metadata=_doc("seconds without a liveness lease before a not-ready node is down"),
    )
    cpu_allocation_ratio: float = field(
        default=4.0, metadata=_doc("vCPUs the scheduler may place per host CPU")
    )
    memory_allocation_ratio: float = field(
        default=1.0, metadata=_doc("guest MiB the scheduler may place per host MiB")
    )
    task_timeout_s: float = field(
        default=600.0, metadata=_doc("a task that has not ended after this many seconds fails")
    )
    image_max_gib: int = field(
        default=20, metadata=_doc("the largest image file a server accepts (upload or download)")
    )
    image_allow_private_urls: bool = field(
        default=False,
        metadata=_doc(
            "let `image import --url` fetch from private/loopback addresses (labs and tests only)"
        ),
    )
    guest_image: str = field(
        default="",
        metadata=_doc(
            "qemu driver: the image sidecar (tiny.json from guest/build.sh) VMs boot; default "
            "$CORRAL_GUEST_DIR/tiny.json or ./.cache/guest/tiny.json"
        ),
    )
    qemu_binary: str = field(
        default="qemu-system-x86_64", metadata=_doc("qemu driver: the QEMU system emulator to run")
    )
    qemu_accel: str = field(
        default="auto", metadata=_doc("qemu driver: auto (KVM when it works, else TCG), kvm or tcg")
    )
    stop_timeout_s: float = field(
        default=60.0,
        metadata=_doc(
            "seconds a guest gets to shut down (ACPI power button) before it is powered off"
        ),
    )
    fake_start_delay_s: float = field(
        default=0.5, metadata=_doc("fake driver: seconds a VM takes to start")
    )
    fake_stop_delay_s: float = field(
        default=0.2, metadata=_doc("fake driver: seconds a VM takes to stop")
    )
    fake_migrate_delay_s: float = field(
        default=0.5,
        metadata=_doc("fake driver: seconds a live migration takes to transfer the guest"),
    )
    fake_fail_start: str = field(
        default="",
        metadata=_doc("fake driver: glob of VM names whose start fails (failure injection)"),
    )
    log_level: str = field(default="info", metadata=_doc("debug, info, warning or error"))

    @property
    def etcd_endpoint_list(self) -> list[str]:
        return [e.strip() for e in self.etcd_endpoints.split(",") if e.strip()]

    @property
    def api_url(self) -> str:
        return f"http://{self.bind}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"http://{self.bind}:{self.grpc_port}"

    @property
    def gossip_address(self) -> str:
        return f"{self.bind}:{self.gossip_port}"

    @property
    def role(self) -> str:
        return "compute" if self.no_server else "server"

    def label_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.labels.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise SettingsError(f"--label / CORRAL_LABELS: {item!r} must look like key=value")
            out[key.strip()] = value.strip()
        return out


def describe(name: str) -> str:
    return f"--{name.replace('_', '-')} / CORRAL_{name.upper()} / {name}"


def _coerce(name: str, kind: Any, raw: Any) -> Any:
    try:
        if kind in (bool, "bool"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in (Path, "Path"):
            return Path(str(raw))
        return str(raw)
    except (TypeError, ValueError):
        raise SettingsError(f"{describe(name)}: {raw!r} is not a valid {kind}") from None


def load_settings(
    flags: dict[str, Any], *, env: dict[str, str] | None = None, config: Path | None = None
) -> AgentSettings:
    """Merge flags (None = not given), CORRAL_* variables and the TOML file into settings."""
    env = dict(os.environ) if env is None else env
    file_values: dict[str, Any] = {}
    config = config or (Path(env["CORRAL_CONFIG"]) if env.get("CORRAL_CONFIG") else None)
    if config is not None:
        try:
            file_values = tomllib.loads(config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"--config {config}: {exc}") from None
    known = {f.name: f for f in dataclasses.fields(AgentSettings)}
    unknown = set(file_values) - set(known)
    if unknown:
        raise SettingsError(
            f"--config {config}: unknown keys {sorted(unknown)}; known keys: {sorted(known)}"
        )
    values: dict[str, Any] = {}
    for name, f in known.items():
        raw: Any = flags.get(name)
        if raw is None:
            raw = env.get(f"CORRAL_{name.upper()}")
        if raw is None:
            raw = file_values.get(name)
        if raw is not None:
            values[name] = _coerce(name, f.type, raw)
    settings = AgentSettings(**values)
    _check(settings)
    return settings


def _check(s: AgentSettings) -> None:
    import re

    if not re.match(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", s.name):
        raise SettingsError(
            f"{describe('name')}: {s.name!r} must be a DNS label (lower-case letters, digits, "
            "'-'); pass --name"
        )
    for port in (
        "http_port",
        "etcd_client_port",
        "etcd_peer_port",
        "grpc_port",
        "gossip_port",
        "gossip_rpc_port",
    ):
        value = getattr(s, port)
        if not 1 <= value <= 65535:
            raise SettingsError(f"{describe(port)}: {value} is not a port (1-65535)")
    for ratio in ("cpu_allocation_ratio", "memory_allocation_ratio"):
        if getattr(s, ratio) <= 0:
            raise SettingsError(f"{describe(ratio)}: must be > 0")
    if s.lease_ttl_s < 2 or s.leader_ttl_s < 2:
        raise SettingsError("lease_ttl_s and leader_ttl_s must be at least 2 seconds")
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise SettingsError(f"{describe('log_level')}: one of debug, info, warning, error")
    if s.bootstrap and s.join:
        raise SettingsError("--bootstrap and --join: pick one (create a cluster, or join one)")
    if s.join and not s.token:
        raise SettingsError("--join needs --token (from `corral token create` on the cluster)")
    if s.bootstrap and s.no_server:
        raise SettingsError("--bootstrap needs a server host: drop --no-server")
    if s.desired_voters not in (1, 3, 5):
        raise SettingsError(f"{describe('desired_voters')}: must be 1, 3 or 5")
    if s.qemu_accel not in ("auto", "kvm", "tcg"):
        raise SettingsError(f"{describe('qemu_accel')}: must be auto, kvm or tcg")
    if s.driver not in DRIVERS:
        raise SettingsError(
            f"{describe('driver')}: {s.driver!r} is not a driver; choose one of "
            f"{', '.join(sorted(DRIVERS))}"
        )
    s.label_dict()
