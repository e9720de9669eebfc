"""`FakeCorralApi`: an in-memory stand-in for the corral REST API v1, for tests.

Serve it with `httpx.MockTransport(fake)` (or `fake.transport()`) and give that transport to
`CorralClient(transport=...)` or to the CLI's `CliConfig(transport=...)`. It answers the shapes
of `design/api.md` for cluster, nodes, VMs and tasks: pagination with opaque cursors, label
selectors, problem+json errors, If-Match, Idempotency-Key replays and `?wait=true`.

Tasks advance one step per `GET /tasks/{id}`: pending -> running (50%) -> succeeded (or
failed, after `fail_next_task`), and only then change the VM. `inject` makes the next matching
request fail with a response or an exception (before or after it is applied). Every request is
recorded in `requests`. Not thread-safe; not a model of scheduling or timing.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

__all__ = ["FakeCorralApi"]

ApiObject = dict[str, Any]
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_FINAL = ("succeeded", "failed", "cancelled")
_ACTION_STEP = {
    "create": ("placing", "starting on {node}"),
    "start": ("placing", "starting on {node}"),
    "stop": ("signalling", "stopping on {node}"),
    "reboot": ("signalling", "rebooting on {node}"),
    "pause": ("signalling", "pausing on {node}"),
    "resume": ("signalling", "resuming on {node}"),
    "delete": ("stopping", "removing from {node}"),
}
_POWER_ACTIONS = ("start", "stop", "reboot", "pause", "resume")
_POWER_STATES = ("running", "stopped", "paused")
_RESTART_POLICIES = ("always", "on-failure", "never")
_TRANSITIONAL = {"create": "pending", "start": "starting", "stop": "stopping", "delete": "deleting"}


class _Problem(Exception):
    def __init__(self, status: int, slug: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.slug, self.detail, self.extra = status, slug, detail, extra


@dataclass
class _Fault:
    fault: httpx.Response | Exception
    method: str | None
    path: str | None
    after: bool
    times: int


def _merge(target: ApiObject, patch: ApiObject) -> ApiObject:
    """RFC 7396 JSON merge patch."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class FakeCorralApi:
    """In-memory corral API; call it with an `httpx.Request` (it is a MockTransport handler).

    `max_page_size` caps every page (set it low to exercise pagination); `now` stamps times;
    `new_id` makes object and task ids (default: random UUIDs).
    State is public: `nodes`, `vms`, `tasks` (by name / id) and `requests` (every request seen).
    """

    def __init__(
        self,
        *,
        max_page_size: int = 1000,
        now: Callable[[], datetime] | None = None,
        cluster_name: str = "corral",
        new_id: Callable[[], str] | None = None,
    ) -> None:
        self.nodes: dict[str, ApiObject] = {}
        self.vms: dict[str, ApiObject] = {}
        self.tasks: dict[str, ApiObject] = {}
        self.snapshots: dict[str, list[ApiObject]] = {}
        """Snapshots by VM name, oldest first (``add_snapshot``; listed, not taken)."""
        self.requests: list[httpx.Request] = []
        self.max_page_size = max_page_size
        self.revision = 1
        self.cluster_id = "c0ffee00-0000-4000-8000-000000000001"
        self.cluster_name = cluster_name
        self.term = 1
        self.learners: set[str] = set()
        """Names of server nodes whose etcd member is a learner (not yet a voter)."""
        self._new_id = new_id or (lambda: str(uuid.uuid4()))
        self._now = now or (lambda: datetime.now(UTC))
        self._faults: list[_Fault] = []
        self._task_errors: list[str] = []
        self._idempotent: dict[str, tuple[bytes, httpx.Response]] = {}
        self._plans: dict[str, tuple[str | None, str | None]] = {}  # task id -> (node, error)
        self._request_seq = 0

    # -- seeding and fault injection ---------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        """An httpx transport served by this fake."""
        return httpx.MockTransport(self)

    def add_node(
        self,
        name: str,
        *,
        state: str = "ready",
        cpus: int = 2,
        memory_mib: int = 24000,
        disk_gib: float = 80.5,
        disk_free_gib: float = 50.1,
        roles: tuple[str, ...] = ("server", "compute"),
        labels: dict[str, str] | None = None,
    ) -> ApiObject:
        """Register a node (the first server node leads the cluster) and return it."""
        node = self._new_object("node", name, {"labels": labels or {}, "roles": list(roles)})
        node["status"] = {
            "state": state,
            "address": f"http://127.0.0.{len(self.nodes) + 1}:8700",
            "driver": "fake",
            "heartbeat_at": self._stamp(),
            "gossip": "alive",
            "message": "",
            "inventory": {
                "cpus": cpus,
                "memory_mib": memory_mib,
                "disk_gib": disk_gib,
                "disk_free_gib": disk_free_gib,
                "hostname": name,
                "kernel": "6.1.0",
                "corral_version": "0.1.0",
            },
        }
        self.nodes[name] = node
        return node

    def add_vm(
        self,
        name: str,
        *,
        vcpus: int = 1,
        memory_mib: int = 512,
        labels: dict[str, str] | None = None,
        state: str = "running",
        node: str | None = None,
    ) -> ApiObject:
        """Store a VM as if it had been created and had reached `state` on `node`."""
        power = state if state in ("stopped", "paused") else "running"
        spec = {
            "vcpus": vcpus,
            "memory_mib": memory_mib,
            "labels": labels or {},
            "restart_policy": "on-failure",
        }
        vm = self._new_object("vm", name, {**spec, "power_state": power})
        vm["generation"] = 1
        vm["status"] = {
            "state": state,
            "node": node,
            "message": "",
            "started_at": self._stamp() if state == "running" else None,
            "observed_generation": 1,
        }
        self.vms[name] = vm
        return vm

    def add_snapshot(
        self,
        vm: str,
        name: str,
        *,
        parent: str | None = None,
        current: bool = False,
        with_memory: bool = False,
        vm_state: str = "running",
        vm_state_bytes: int = 0,
        disk_bytes: int = 0,
    ) -> ApiObject:
        """Store a ready snapshot of ``vm`` (served by ``GET /vms/{vm}/snapshots``)."""
        snap = self._new_object("snapshot", f"{vm}.{name}", {"vm": vm, "snapshot": name})
        snap["status"] = {
            "state": "ready",
            "vm_id": self.vms[vm]["id"],
            "parent": parent,
            "current": current,
            "with_memory": with_memory,
            "vm_state": vm_state,
            "vm_state_bytes": vm_state_bytes,
            "disk_bytes": disk_bytes,
            "disks": [],
            "message": "",
        }
        self.snapshots.setdefault(vm, []).append(snap)
        return snap

    def fail_next_task(self, error: str) -> None:
        """The next task created will end `failed` with `error` instead of succeeding."""
        self._task_errors.append(error)

    def inject(
        self,
        fault: httpx.Response | Exception,
        *,
        method: str | None = None,
        path: str | None = None,
        after: bool = False,
        times: int = 1,
    ) -> None:
        """Answer the next `times` requests matching `method` and `path` (prefix) with
        `fault`: a response to return or an exception to raise. With `after`, the request is
        applied first and its answer lost (as when a connection drops mid-response).
        """
        self._faults.append(_Fault(fault, method, path, after, times))

    def advance(self, task_id: str) -> ApiObject:
        """Move a task one step on (pending -> running -> final) and return it."""
        task = self.tasks[task_id]
        status = task["status"]
        if status["state"] == "pending":
            status.update(state="running", progress=0.5, started_at=self._stamp())
            status["steps"][0].update(state="done", finished_at=self._stamp())
            status["steps"][1].update(state="running", started_at=self._stamp())
            status["step"] = status["steps"][1]["name"]
        elif status["state"] == "running":
            self._finish(task)
        self._touch(task)
        return task

    # -- plumbing ----------------------------------------------------------------------------

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        fault = self._take_fault(request)
        if fault is not None and not fault.after:
            return self._deliver(fault.fault, request)
        idem_key = request.headers.get("idempotency-key")
        if request.method == "POST" and idem_key and idem_key in self._idempotent:
            body, first = self._idempotent[idem_key]
            if body == request.content:
                response = httpx.Response(
                    first.status_code, headers=first.headers, content=first.content
                )
            else:
                response = self._problem(_Problem(409, "conflict", "Idempotency-Key reused"))
        else:
            try:
                response = self._route(request)
            except _Problem as problem:
                response = self._problem(problem)
            if request.method == "POST" and idem_key and response.status_code < 300:
                self._idempotent[idem_key] = (request.content, response)
        response.headers.setdefault("X-Request-Id", self._request_id())
        if fault is not None:
            return self._deliver(fault.fault, request)
        return response

    def _take_fault(self, request: httpx.Request) -> _Fault | None:
        for fault in self._faults:
            if fault.method and fault.method != request.method:
                continue
            if fault.path and not request.url.path.startswith(fault.path):
                continue
            fault.times -= 1
            if fault.times <= 0:
                self._faults.remove(fault)
            return fault
        return None

    def _deliver(self, fault: httpx.Response | Exception, request: httpx.Request) -> httpx.Response:
        if isinstance(fault, Exception):
            raise fault
        return httpx.Response(fault.status_code, headers=fault.headers, content=fault.content)

    def _request_id(self) -> str:
        self._request_seq += 1
        return f"req-{self._request_seq:04d}"

    def _stamp(self) -> str:
        return self._now().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _new_object(self, kind: str, name: str, spec: ApiObject) -> ApiObject:
        self.revision += 1
        stamp = self._stamp()
        return {
            "kind": kind,
            "name": name,
            "id": self._new_id(),
            "spec": spec,
            "status": {},
            "create_revision": self.revision,
            "mod_revision": self.revision,
            "created_at": stamp,
            "updated_at": stamp,
        }

    def _touch(self, obj: ApiObject) -> None:
        self.revision += 1
        obj["mod_revision"] = self.revision
        obj["updated_at"] = self._stamp()

    def _problem(self, problem: _Problem) -> httpx.Response:
        titles = {
            400: "Malformed request",
            404: "Not found",
            409: "Conflict",
            412: "Precondition failed",
            422: "Invalid request",
        }
        body = {
            "type": f"https://corral.dev/errors/{problem.slug}",
            "title": titles.get(problem.status, "Error"),
            "status": problem.status,
            "detail": problem.detail,
            "request_id": self._request_id(),
            **problem.extra,
        }
        headers = {"Content-Type": "application/problem+json", "X-Request-Id": body["request_id"]}
        return httpx.Response(problem.status, content=json.dumps(body).encode(), headers=headers)

    @staticmethod
    def _json(status: int, data: object, etag: int | None = None) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if etag is not None:
            headers["ETag"] = f'"{etag}"'
        return httpx.Response(status, content=json.dumps(data).encode(), headers=headers)

    # -- routing -----------------------------------------------------------------------------

    def _route(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path in ("/healthz", "/readyz"):
            return httpx.Response(200, text="ok")
        if not path.startswith("/api/v1/"):
            raise _Problem(404, "not-found", f"no route {path}")
        parts = path[len("/api/v1/") :].strip("/").split("/")
        method, query = request.method, request.url.params
        if parts == ["cluster"] and method == "GET":
            return self._json(200, self._cluster())
        kind = parts[0]
        if kind == "nodes" and method == "GET":
            if len(parts) == 1:
                return self._list(sorted(self.nodes.values(), key=lambda n: n["name"]), query)
            return self._one(self._allocated(self._get(self.nodes, "node", parts[1])))
        if kind == "vms":
            return self._route_vms(request, parts[1:])
        if kind == "tasks":
            if len(parts) == 1 and method == "GET":
                return self._list(list(self.tasks.values()), query)
            task = self._get(self.tasks, "task", parts[1])
            if len(parts) == 2 and method == "GET":
                return self._one(self.advance(task["id"]))
        raise _Problem(404, "not-found", f"no route {method} {path}")

    def _route_vms(self, request: httpx.Request, rest: list[str]) -> httpx.Response:
        method, query = request.method, request.url.params
        if not rest:
            if method == "GET":
                return self._list(sorted(self.vms.values(), key=lambda v: v["name"]), query)
            if method == "POST":
                return self._create_vm(request)
        vm = self._get(self.vms, "vm", rest[0])
        if len(rest) == 1 and method == "GET":
            return self._one(vm)
        if rest[1:] == ["snapshots"] and method == "GET":
            # One page, as the server answers (a VM has few snapshots).
            items = list(self.snapshots.get(rest[0], []))
            return self._json(200, {"items": items, "next_cursor": None, "revision": self.revision})
        self._check_if_match(request, vm)
        if len(rest) == 1 and method == "PATCH":
            return self._one(self._patch_vm(vm, self._body(request)))
        if len(rest) == 1 and method == "DELETE":
            return self._action(vm, "delete", query)
        if len(rest) == 2 and method == "POST" and rest[1] in _POWER_ACTIONS:
            return self._action(vm, rest[1], query, self._body(request) or {})
        raise _Problem(404, "not-found", f"no route {method} {request.url.path}")

    @staticmethod
    def _body(request: httpx.Request) -> ApiObject:
        if not request.content:
            return {}
        try:
            data = json.loads(request.content)
        except ValueError:
            raise _Problem(400, "malformed", "the body is not JSON") from None
        if not isinstance(data, dict):
            raise _Problem(400, "malformed", "the body must be a JSON object")
        return data

    @staticmethod
    def _get(store: dict[str, ApiObject], kind: str, name: str) -> ApiObject:
        if name not in store:
            raise _Problem(404, "not-found", f"{kind} {name} not found")
        return store[name]

    def _one(self, obj: ApiObject) -> httpx.Response:
        return self._json(200, obj, etag=obj["mod_revision"])

    def _check_if_match(self, request: httpx.Request, obj: ApiObject) -> None:
        expected = request.headers.get("if-match")
        if expected is not None and expected.strip('"') != str(obj["mod_revision"]):
            raise _Problem(
                412,
                "precondition-failed",
                f"{obj['kind']} {obj['name']} is at revision {obj['mod_revision']}, "
                f"not {expected.strip(chr(34))}",
            )

    def _list(self, objects: list[ApiObject], query: httpx.QueryParams) -> httpx.Response:
        selected = [o for o in objects if self._selected(o, query)]
        limit = min(int(query.get("limit") or 100), self.max_page_size)
        start = int(query.get("cursor", "o:0").removeprefix("o:"))
        page = selected[start : start + limit]
        more = start + limit < len(selected)
        body = {
            "items": [self._allocated(o) if o["kind"] == "node" else o for o in page],
            "next_cursor": f"o:{start + limit}" if more else None,
            "revision": self.revision,
        }
        return self._json(200, body)

    @staticmethod
    def _selected(obj: ApiObject, query: httpx.QueryParams) -> bool:
        status, spec = obj["status"], obj["spec"]
        if "state" in query and status.get("state") != query["state"]:
            return False
        if "node" in query and status.get("node") != query["node"]:
            return False
        if "label" in query and not _matches(spec.get("labels") or {}, query["label"]):
            return False
        if "target" in query:
            target = spec.get("target") or {}
            return f"{target.get('kind')}/{target.get('name')}" == query["target"]
        return True

    def _allocated(self, node: ApiObject) -> ApiObject:
        vms = [v for v in self.vms.values() if v["status"].get("node") == node["name"]]
        node["status"]["allocated"] = {
            "vcpus": sum(v["spec"]["vcpus"] for v in vms),
            "memory_mib": sum(v["spec"]["memory_mib"] for v in vms),
            "vms": len(vms),
        }
        return node

    def _cluster(self) -> ApiObject:
        servers = [n for n in self.nodes.values() if "server" in n["spec"]["roles"]]
        leader = next((n for n in servers if n["status"]["state"] == "ready"), None)
        members = [
            {
                "name": n["name"],
                "id": n["id"].replace("-", "")[:16],
                "peer_urls": [f"http://{n['name']}:8703"],
                "client_urls": [f"http://{n['name']}:8702"],
                "is_learner": n["name"] in self.learners,
                "healthy": n["status"]["state"] == "ready",
                "is_leader": n is leader,
                "raft_index": self.revision,
                "lag": 0,
            }
            for n in servers
        ]
        return {
            "kind": "cluster",
            "id": self.cluster_id,
            "name": self.cluster_name,
            "version": "0.1.0",
            "revision": self.revision,
            "leader": None
            if leader is None
            else {"node": leader["name"], "term": self.term, "since": leader["created_at"]},
            "members": members,
            "nodes": {
                "total": len(self.nodes),
                "ready": sum(n["status"]["state"] == "ready" for n in self.nodes.values()),
            },
            "vms": {
                "total": len(self.vms),
                "running": sum(v["status"]["state"] == "running" for v in self.vms.values()),
            },
        }

    # -- writes ------------------------------------------------------------------------------

    def _validate_spec(self, spec: ApiObject) -> list[dict[str, str]]:
        errors = []
        vcpus, memory = spec.get("vcpus"), spec.get("memory_mib")
        if not isinstance(vcpus, int) or vcpus < 1:
            errors.append({"field": "vcpus", "rule": "ge", "message": "must be >= 1"})
        if not isinstance(memory, int) or memory < 64:
            errors.append({"field": "memory_mib", "rule": "ge", "message": "must be >= 64"})
        if spec.get("power_state") not in _POWER_STATES:
            errors.append(
                {
                    "field": "power_state",
                    "rule": "enum",
                    "message": "must be running, stopped or paused",
                }
            )
        if spec.get("restart_policy", "on-failure") not in _RESTART_POLICIES:
            errors.append(
                {
                    "field": "restart_policy",
                    "rule": "enum",
                    "message": "must be always, on-failure or never",
                }
            )
        labels = spec.get("labels")
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            errors.append({"field": "labels", "rule": "type", "message": "must map str to str"})
        return errors

    def _raise_invalid(self, errors: list[dict[str, str]]) -> None:
        if errors:
            first = errors[0]
            raise _Problem(
                422, "validation", f"{first['field']}: {first['message']}", errors=errors
            )

    def _create_vm(self, request: httpx.Request) -> httpx.Response:
        body = self._body(request)
        name = body.pop("name", None)
        spec = {
            "vcpus": 1,
            "memory_mib": 512,
            "labels": {},
            "power_state": "running",
            "restart_policy": "on-failure",
            **body,
        }
        errors = self._validate_spec(spec)
        if not isinstance(name, str) or not _DNS_LABEL.match(name):
            errors.insert(0, {"field": "name", "rule": "pattern", "message": "must be a DNS label"})
        self._raise_invalid(errors)
        assert isinstance(name, str)
        if name in self.vms:
            raise _Problem(409, "conflict", f"vm {name} already exists")
        if request.url.params.get("dry_run") == "true":
            return self._json(200, {"object": {"name": name, "spec": spec}, "task": None})
        vm = self._new_object("vm", name, spec)
        vm["generation"] = 1
        vm["status"] = {
            "state": "pending",
            "node": None,
            "message": "",
            "started_at": None,
            "observed_generation": 0,
        }
        self.vms[name] = vm
        return self._submit(vm, "create", request.url.params, {})

    def _patch_vm(self, vm: ApiObject, patch: ApiObject) -> ApiObject:
        spec = _merge(vm["spec"], patch)
        self._raise_invalid(self._validate_spec(spec))
        if spec != vm["spec"]:
            vm["spec"] = spec
            vm["generation"] += 1
            self._touch(vm)
        return vm

    def _action(
        self, vm: ApiObject, action: str, query: httpx.QueryParams, params: ApiObject | None = None
    ) -> httpx.Response:
        state = vm["status"]["state"]
        if action == "start" and state == "running":
            raise _Problem(409, "conflict", f"vm {vm['name']} is already running")
        if action in ("stop", "reboot", "pause", "resume") and state in ("stopped", "pending"):
            raise _Problem(409, "conflict", f"vm {vm['name']} is {state}")
        power = {"start": "running", "resume": "running", "stop": "stopped", "pause": "paused"}
        if action in power:
            vm["spec"]["power_state"] = power[action]
            vm["generation"] += 1
        vm["status"]["state"] = _TRANSITIONAL.get(action, state)
        self._touch(vm)
        return self._submit(vm, action, query, params or {})

    def _submit(
        self, vm: ApiObject, action: str, query: httpx.QueryParams, params: ApiObject
    ) -> httpx.Response:
        node = vm["status"].get("node") or self._place()
        first, second = _ACTION_STEP[action]
        task_id = self._new_id()
        task = self._new_object(
            "task",
            task_id,
            {"action": action, "target": {"kind": "vm", "name": vm["name"]}, "params": params},
        )
        task["id"] = task_id
        task.update(actor="token:test", request_id=self._request_id())
        task["status"] = {
            "state": "pending",
            "progress": 0.0,
            "step": "queued",
            "steps": [
                {"name": first, "state": "pending", "started_at": None, "finished_at": None},
                {
                    "name": second.format(node=node),
                    "state": "pending",
                    "started_at": None,
                    "finished_at": None,
                },
            ],
            "result": None,
            "error": None,
            "started_at": None,
            "finished_at": None,
        }
        self._plans[task_id] = (node, self._task_errors.pop(0) if self._task_errors else None)
        self.tasks[task_id] = task
        if query.get("wait") == "true":
            while task["status"]["state"] not in _FINAL:
                self.advance(task_id)
            return self._json(200, {"object": self.vms.get(vm["name"]), "task": task})
        return self._json(202, {"object": vm, "task": task})

    def _place(self) -> str | None:
        ready = sorted(n["name"] for n in self.nodes.values() if n["status"]["state"] == "ready")
        return ready[0] if ready else None

    def _finish(self, task: ApiObject) -> None:
        status = task["status"]
        status.update(progress=1.0, finished_at=self._stamp())
        vm = self.vms.get(task["spec"]["target"]["name"])
        node, error = self._plans.pop(task["id"], (None, None))
        if error:
            status.update(state="failed", error=error, step=status["steps"][1]["name"])
            status["steps"][1]["state"] = "failed"
            if vm is not None:
                vm["status"].update(state="failed", message=error)
                self._touch(vm)
            return
        status.update(state="succeeded", step="done", result={})
        status["steps"][1].update(state="done", finished_at=self._stamp())
        if vm is None:
            return
        action = task["spec"]["action"]
        if action == "delete":
            del self.vms[vm["name"]]
            return
        power = vm["spec"]["power_state"]
        started_at = vm["status"].get("started_at") if action in ("pause", "resume") else None
        vm["status"].update(
            state=power,
            node=node,
            started_at=None if power == "stopped" else started_at or self._stamp(),
            observed_generation=vm["generation"],
            message="",
        )
        self._touch(vm)
