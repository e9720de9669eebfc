"""`CorralClient`: the synchronous, typed client of the corral REST API v1.

All HTTP goes through `CorralClient._send`, the one place where httpx errors and error
responses are translated into `corral.client.errors` (raised `from` the original).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, cast
from urllib.parse import quote

import httpx

from corral.client._resources import (
    DEFAULT_ADDR,
    TASK_FINAL_STATES,
    ActionResult,
    ApiObject,
    Page,
    Pager,
    if_match_value,
    normalize_addr,
    task_state,
)
from corral.client.errors import (
    ApiError,
    TaskWaitTimeout,
    Unavailable,
    error_from_response,
    error_from_transport,
)

__all__ = ["CorralClient"]

_API = "/api/v1"
_RETRYABLE = (httpx.NetworkError, httpx.RemoteProtocolError)
"""Failures after which the request may or may not have reached the server."""
_MAX_UNAVAILABLE_POLLS = 5
"""Consecutive `Unavailable` answers `wait_task` rides out (e.g. a leader election)."""
_MERGE_PATCH = "application/merge-patch+json"
_SERVER_MAX_WAIT = 300.0
"""The longest `?wait=true&timeout=` the server honours; bounds the read timeout of waits."""

Params = dict[str, str]


def _seg(value: str) -> str:
    """One URL path segment; a name can never add a path component."""
    return quote(value, safe="")


def _params(**values: str | int | float | bool | None) -> Params:
    out: Params = {}
    for key, value in values.items():
        if value is None:
            continue
        out[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


class CorralClient:
    """Synchronous client of the corral REST API; use it as a context manager or `close()` it.

    `base_url` accepts `host:port` or a full URL (see `normalize_addr`; ValueError if bad).
    `timeout` bounds every request in seconds (waits with `wait=True` get `timeout` on top).
    `transport` replaces httpx's network transport (tests pass an `httpx.MockTransport`).
    `sleep` and `clock` drive `wait_task` polling (tests inject fakes).

    Every method returns the API's JSON as plain dicts and raises a `corral.client.errors`
    exception, never an httpx one. Each POST carries a fresh `Idempotency-Key`; GETs and those
    POSTs are retried once when the connection fails, so a retried create never creates twice.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_ADDR,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base_url = normalize_addr(base_url)
        self._timeout = timeout
        self._sleep = sleep
        self._clock = clock
        default_headers = {
            "Accept": "application/json, application/problem+json",
            "User-Agent": f"corral-client (python-httpx/{httpx.__version__})",
        }
        default_headers.update(headers or {})
        self._http = httpx.Client(
            base_url=self._base_url,
            timeout=timeout,
            transport=transport,
            headers=default_headers,
        )

    @property
    def base_url(self) -> str:
        """The normalized base URL requests go to, e.g. `http://127.0.0.1:8700`."""
        return self._base_url

    def close(self) -> None:
        """Close pooled connections; the client is unusable afterwards."""
        self._http.close()

    def __enter__(self) -> CorralClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the one HTTP boundary ---------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        body: object = None,
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        wait_timeout: float | None = None,
        waits: bool = False,
    ) -> httpx.Response:
        """Send one request and return a 2xx response, or raise an `ApiError` subclass.

        `waits` marks a `?wait=true` request: its read timeout grows by `wait_timeout` (by the
        server's longest wait when that is None).
        """
        send_headers = dict(headers or {})
        content: bytes | None = None
        if body is not None:
            content = json.dumps(body).encode()
            send_headers["Content-Type"] = content_type
        if method == "POST":
            send_headers.setdefault("Idempotency-Key", str(uuid.uuid4()))
        retry = method == "GET" or "Idempotency-Key" in send_headers
        timeout: httpx.Timeout | None = None
        if waits:
            waited = _SERVER_MAX_WAIT if wait_timeout is None else wait_timeout
            timeout = httpx.Timeout(self._timeout, read=waited + self._timeout)
        attempts = 2 if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                response = self._http.request(
                    method,
                    path,
                    params=params,
                    content=content,
                    headers=send_headers,
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
            except _RETRYABLE as exc:
                if attempt < attempts:
                    continue
                raise error_from_transport(exc, self._base_url, self._timeout) from exc
            except httpx.HTTPError as exc:
                raise error_from_transport(exc, self._base_url, self._timeout) from exc
            if response.is_error:
                raise error_from_response(response)
            return response
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except (ValueError, UnicodeDecodeError) as exc:
            kind = response.headers.get("content-type", "unknown type")
            raise ApiError(
                f"{self._base_url} answered HTTP {response.status_code} with a body that is not "
                f"JSON ({kind}); does CORRAL_ADDR / --addr point at a corral server?",
                status=response.status_code,
                slug="invalid-response",
                request_id=response.headers.get("x-request-id"),
            ) from exc

    def _object(self, response: httpx.Response) -> ApiObject:
        data = self._json(response)
        if not isinstance(data, dict):
            raise ApiError(
                f"{self._base_url} answered {response.request.url.path} with "
                f"{type(data).__name__}, not a JSON object",
                status=response.status_code,
                slug="invalid-response",
                request_id=response.headers.get("x-request-id"),
            )
        return cast(ApiObject, data)

    def _get(self, path: str, params: Params | None = None) -> ApiObject:
        return self._object(self._send("GET", path, params=params))

    def _page(self, path: str, params: Params) -> Page:
        data = self._get(path, params)
        items = data.get("items")
        if not isinstance(items, list):
            raise ApiError(f"{self._base_url}{path} did not return a list (no 'items')")
        cursor = data.get("next_cursor")
        return {
            "items": items,
            "next_cursor": str(cursor) if cursor else None,
            "revision": int(data.get("revision") or 0),
        }

    def _pager(self, path: str, params: Params) -> Pager:
        def fetch(cursor: str | None) -> Page:
            return self._page(path, {**params, **_params(cursor=cursor)})

        return Pager(fetch)

    def _action_result(self, response: httpx.Response) -> ActionResult:
        data = self._json(response)
        if data is None:
            return {"object": {}, "task": None}
        if not isinstance(data, dict):
            raise ApiError(f"{self._base_url} answered with {type(data).__name__}, not an object")
        if "object" in data:
            data.setdefault("task", None)
            return cast(ActionResult, data)
        return {"object": cast(ApiObject, data), "task": None}

    @staticmethod
    def _wait_params(wait: bool, timeout: float | None) -> Params:
        if not wait:
            return {}
        return _params(wait=True, timeout=timeout)

    # -- cluster and health ------------------------------------------------------------------

    def cluster(self) -> ApiObject:
        """`GET /api/v1/cluster`: id, version, revision, leader, etcd members, counts."""
        return self._get(f"{_API}/cluster")

    def healthz(self) -> bool:
        """True if the process answers `GET /healthz` with 2xx; False on 503."""
        return self._probe("/healthz")

    def readyz(self) -> bool:
        """True if the server is ready to serve (`GET /readyz` 2xx); False on 503."""
        return self._probe("/readyz")

    def _probe(self, path: str) -> bool:
        try:
            self._send("GET", path)
        except Unavailable as exc:
            if exc.status is None:
                raise
            return False
        return True

    # -- nodes -------------------------------------------------------------------------------

    def configure_cluster(self, patch: Mapping[str, object]) -> ApiObject:
        """Merge-patch the cluster config (desired_voters, server_dead_grace_s)."""
        return self._object(self._send("PATCH", f"{_API}/cluster", body=dict(patch)))

    def create_token(
        self,
        *,
        ttl_s: int = 3600,
        uses: int | None = None,
        role: str = "server",
        description: str = "",
    ) -> ApiObject:
        """A new join token; its `secret` field is shown only in this answer."""
        body = {"ttl_s": ttl_s, "uses": uses, "role": role, "description": description}
        return self._object(self._send("POST", f"{_API}/tokens", body=body))

    def list_tokens(self) -> Page:
        return self._page(f"{_API}/tokens", {})

    def revoke_token(self, token_id: str) -> ApiObject:
        return self._object(self._send("POST", f"{_API}/tokens/{_seg(token_id)}/revoke"))

    def remove_node(self, name: str) -> ApiObject:
        """Retire a host that no longer runs (its etcd member is removed by the leader)."""
        return self._object(self._send("DELETE", f"{_API}/nodes/{_seg(name)}"))

    def list_nodes(
        self,
        *,
        label: str | None = None,
        state: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        """One page of nodes matching the label selector and state."""
        params = _params(label=label, state=state, limit=limit, cursor=cursor)
        return self._page(f"{_API}/nodes", params)

    def iter_nodes(
        self, *, label: str | None = None, state: str | None = None, page_size: int | None = None
    ) -> Pager:
        """Every node matching the filters, page after page."""
        return self._pager(f"{_API}/nodes", _params(label=label, state=state, limit=page_size))

    def get_node(self, name: str) -> ApiObject:
        """One node; NotFound if there is none by that name."""
        return self._get(f"{_API}/nodes/{_seg(name)}")

    # -- vms ---------------------------------------------------------------------------------

    def list_vms(
        self,
        *,
        label: str | None = None,
        node: str | None = None,
        state: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        """One page of VMs; `label` is a selector like `tier=web,env!=prod`."""
        params = _params(label=label, node=node, state=state, limit=limit, cursor=cursor)
        return self._page(f"{_API}/vms", params)

    def iter_vms(
        self,
        *,
        label: str | None = None,
        node: str | None = None,
        state: str | None = None,
        page_size: int | None = None,
    ) -> Pager:
        """Every VM matching the filters, page after page."""
        params = _params(label=label, node=node, state=state, limit=page_size)
        return self._pager(f"{_API}/vms", params)

    def get_vm(self, name: str) -> ApiObject:
        """One VM; NotFound if there is none by that name."""
        return self._get(f"{_API}/vms/{_seg(name)}")

    def console_log(self, name: str, *, max_bytes: int = 64 * 1024) -> str:
        """The last bytes the VM printed on its serial console (NotFound if it has none)."""
        response = self._send(
            "GET", f"{_API}/vms/{_seg(name)}/console/log", params={"bytes": str(max_bytes)}
        )
        return response.content.decode("utf-8", errors="replace")

    def console_ticket(self, name: str, console: str = "serial") -> ApiObject:
        """`POST /api/v1/vms/{name}/console/ticket`: a single-use ticket (valid about 60 s) for
        the VM's `console` ("serial" or "vnc"): `{ticket, vm, vm_id, console, expires_at,
        path}`. Connect to `console_url(ticket)` with a WebSocket client to use it. Raises
        NotFound (no such VM) or Conflict (not running, or its host's driver has no consoles).
        """
        response = self._send(
            "POST", f"{_API}/vms/{_seg(name)}/console/ticket", body={"console": console}
        )
        return self._object(response)

    def console_url(self, ticket: ApiObject) -> str:
        """The ws:// (or wss://) URL of the console a `console_ticket` answer opens."""
        path = str(ticket.get("path") or "")
        if not path.startswith("/"):
            raise ApiError(f"{self._base_url} answered a console ticket without a path")
        scheme, rest = self._base_url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest.rstrip('/')}{path}"

    def create_vm(
        self,
        spec: Mapping[str, Any],
        *,
        wait: bool = False,
        timeout: float | None = None,
        dry_run: bool = False,
    ) -> ActionResult:
        """`POST /api/v1/vms` with `spec` (`name` plus optional vcpus, memory_mib, labels,
        power_state). Returns at once with the pending task, or with `wait` once the task has
        ended (or `timeout` seconds passed: check the task's state). `dry_run` validates and
        plans only. Raises ValidationFailed, Conflict (name taken), Unschedulable, ...
        """
        params = {**self._wait_params(wait, timeout), **_params(dry_run=dry_run or None)}
        response = self._send(
            "POST", f"{_API}/vms", params=params, body=dict(spec), wait_timeout=timeout, waits=wait
        )
        return self._action_result(response)

    def patch_vm(
        self, name: str, patch: Mapping[str, Any], *, if_match: int | str | None = None
    ) -> ApiObject:
        """Apply a JSON merge patch to the VM's spec (a None value removes a key, e.g. a
        label) and return the updated object. With `if_match` (a `mod_revision`), raises
        PreconditionFailed if the VM changed since.
        """
        headers = {"If-Match": if_match_value(if_match)} if if_match is not None else None
        response = self._send(
            "PATCH",
            f"{_API}/vms/{_seg(name)}",
            body=dict(patch),
            headers=headers,
            content_type=_MERGE_PATCH,
        )
        return self._object(response)

    def delete_vm(
        self,
        name: str,
        *,
        wait: bool = False,
        timeout: float | None = None,
        if_match: int | str | None = None,
        with_disks: bool = False,
    ) -> ActionResult:
        """Delete a VM: returns the object and the deleting task (see `create_vm` for `wait`).
        `with_disks` also deletes its volumes once the VM is gone."""
        headers = {"If-Match": if_match_value(if_match)} if if_match is not None else None
        response = self._send(
            "DELETE",
            f"{_API}/vms/{_seg(name)}",
            params={**self._wait_params(wait, timeout), **_params(with_disks=with_disks or None)},
            headers=headers,
            wait_timeout=timeout,
            waits=wait,
        )
        return self._action_result(response)

    def vm_action(
        self,
        name: str,
        action: str,
        body: Mapping[str, Any] | None = None,
        *,
        wait: bool = False,
        timeout: float | None = None,
        if_match: int | str | None = None,
    ) -> ActionResult:
        """`POST /api/v1/vms/{name}/{action}` (start, stop, reboot, ...) with an optional body
        (stop takes `{"force": true}`); returns the object and its task (see `create_vm`).
        """
        headers = {"If-Match": if_match_value(if_match)} if if_match is not None else None
        response = self._send(
            "POST",
            f"{_API}/vms/{_seg(name)}/{_seg(action)}",
            params=self._wait_params(wait, timeout),
            body=dict(body) if body is not None else None,
            headers=headers,
            wait_timeout=timeout,
            waits=wait,
        )
        return self._action_result(response)

    def migrate_vm(
        self,
        name: str,
        body: Mapping[str, Any] | None = None,
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> ActionResult:
        """`POST /api/v1/vms/{name}/migrate`: live-migrate (body: `target`, `max_downtime_ms`,
        `bandwidth_mib_s`, `timeout_s`); returns the VM and the migrate task."""
        response = self._send(
            "POST",
            f"{_API}/vms/{_seg(name)}/migrate",
            params=self._wait_params(wait, timeout),
            body=dict(body or {}),
            wait_timeout=timeout,
            waits=wait,
        )
        return self._action_result(response)

    def migrate_plan(self, name: str, body: Mapping[str, Any] | None = None) -> ApiObject:
        """The dry run of `migrate_vm`: the target the scheduler picks and why."""
        response = self._send(
            "POST",
            f"{_API}/vms/{_seg(name)}/migrate",
            params={"dry_run": "true"},
            body=dict(body or {}),
        )
        return self._object(response)

    # -- placement ---------------------------------------------------------------------------

    def vm_placement(self, name: str) -> ApiObject:
        """`GET /api/v1/vms/{name}/placement`: every host with the filter that rejected it or
        its scores (`corral vm why`)."""
        return self._get(f"{_API}/vms/{_seg(name)}/placement")

    def capacity(self, vcpus: int, memory_mib: int, tolerate_failures: int = 0) -> ApiObject:
        """`GET /api/v1/capacity`: how many more VMs of this shape fit, per host and in all."""
        return self._get(
            f"{_API}/capacity",
            _params(
                vcpus=vcpus,
                memory_mib=memory_mib,
                tolerate_failures=tolerate_failures or None,
            ),
        )

    def node_action(
        self,
        name: str,
        action: str,
        body: Mapping[str, Any] | None = None,
        *,
        dry_run: bool = False,
    ) -> ApiObject:
        """`POST /api/v1/nodes/{name}/{action}` (cordon, uncordon, drain, undrain,
        maintenance/on, maintenance/off). Drain answers `{"object", "task", "plan"}`."""
        path = f"{_API}/nodes/{_seg(name)}/" + "/".join(_seg(p) for p in action.split("/"))
        response = self._send(
            "POST",
            path,
            params=_params(dry_run=dry_run or None),
            body=dict(body) if body is not None else None,
        )
        return self._object(response)

    def patch_node(self, name: str, patch: Mapping[str, Any]) -> ApiObject:
        response = self._send(
            "PATCH", f"{_API}/nodes/{_seg(name)}", body=dict(patch), content_type=_MERGE_PATCH
        )
        return self._object(response)

    def rebalance(self, body: Mapping[str, Any] | None = None, *, dry_run: bool) -> ApiObject:
        """`POST /api/v1/cluster/rebalance`: `{"plan": {...}, "task": ... | None}`."""
        response = self._send(
            "POST",
            f"{_API}/cluster/rebalance",
            params=_params(dry_run=dry_run or None),
            body=dict(body) if body is not None else None,
        )
        return self._object(response)

    def cancel_task(self, task_id: str) -> ApiObject:
        """`POST /api/v1/tasks/{id}/cancel`: stop a running migration, drain or rebalance."""
        return self._object(self._send("POST", f"{_API}/tasks/{_seg(task_id)}/cancel"))

    # -- storage -----------------------------------------------------------------------------

    def list_objects(self, kind: str, **filters: str | None) -> Page:
        """One list of `pools`, `volumes` or `images` (these lists are not paginated)."""
        return self._page(f"{_API}/{_seg(kind)}", _params(**filters))

    def get_object(self, kind: str, name: str) -> ApiObject:
        return self._get(f"{_API}/{_seg(kind)}/{_seg(name)}")

    def create_object(self, kind: str, body: Mapping[str, Any]) -> ApiObject:
        """`POST /api/v1/{kind}`: a pool, volume or image record (201, or 202 while an image
        downloads)."""
        return self._object(self._send("POST", f"{_API}/{_seg(kind)}", body=dict(body)))

    def patch_object(self, kind: str, name: str, patch: Mapping[str, Any]) -> ApiObject:
        response = self._send(
            "PATCH",
            f"{_API}/{_seg(kind)}/{_seg(name)}",
            body=dict(patch),
            content_type=_MERGE_PATCH,
        )
        return self._object(response)

    def delete_object(
        self, kind: str, name: str, *, wait: bool = False, timeout: float | None = None
    ) -> ApiObject:
        """Delete a pool, volume or image; a volume goes through the leader (`wait` returns
        once it is gone: `{"deleted": name}`)."""
        response = self._send(
            "DELETE",
            f"{_API}/{_seg(kind)}/{_seg(name)}",
            params=self._wait_params(wait, timeout),
            wait_timeout=timeout,
            waits=wait,
        )
        return self._object(response)

    def upload_image_file(
        self,
        name: str,
        file: str,
        chunks: Iterable[bytes],
        *,
        sha256: str | None = None,
    ) -> ApiObject:
        """Stream one file of an image (`disk`, `kernel` or `initrd`) to the server; with
        `sha256` the server checks the content before keeping it."""
        headers = {"Content-Type": "application/octet-stream"}
        if sha256:
            headers["X-Content-SHA256"] = sha256
        try:
            response = self._http.put(
                f"{_API}/images/{_seg(name)}/files/{_seg(file)}",
                content=chunks,
                headers=headers,
                timeout=httpx.Timeout(self._timeout, read=600.0, write=600.0),
            )
        except httpx.HTTPError as exc:
            raise error_from_transport(exc, self._base_url, self._timeout) from exc
        if response.is_error:
            raise error_from_response(response)
        return self._object(response)

    def attach_disk(
        self, vm: str, volume: str, *, wait: bool = False, timeout: float | None = None
    ) -> ActionResult:
        """Attach a volume to a VM (hot-plugged when it runs); returns the VM and the task."""
        response = self._send(
            "POST",
            f"{_API}/vms/{_seg(vm)}/disks",
            params=self._wait_params(wait, timeout),
            body={"volume": volume},
            wait_timeout=timeout,
            waits=wait,
        )
        return self._action_result(response)

    def detach_disk(
        self, vm: str, volume: str, *, wait: bool = False, timeout: float | None = None
    ) -> ActionResult:
        response = self._send(
            "DELETE",
            f"{_API}/vms/{_seg(vm)}/disks/{_seg(volume)}",
            params=self._wait_params(wait, timeout),
            wait_timeout=timeout,
            waits=wait,
        )
        return self._action_result(response)

    # -- snapshots, clones, templates ----------------------------------------------------------

    def _act(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> ActionResult:
        """A write that answers `{"object", "task"}` at once (the CLI waits on the task)."""
        return self._action_result(
            self._send(method, path, body=dict(body) if body is not None else None)
        )

    def list_snapshots(self, vm: str) -> Page:
        """The VM's snapshots, oldest first; each names its `status.parent` (a tree)."""
        return self._page(f"{_API}/vms/{_seg(vm)}/snapshots", {})

    def create_snapshot(self, vm: str, name: str, *, memory: bool | None = None) -> ActionResult:
        """Snapshot the VM's disks (and its RAM with `memory`; None: when it runs)."""
        return self._act(
            "POST", f"{_API}/vms/{_seg(vm)}/snapshots", {"name": name, "memory": memory}
        )

    def rollback_snapshot(self, vm: str, name: str) -> ActionResult:
        return self._act("POST", f"{_API}/vms/{_seg(vm)}/snapshots/{_seg(name)}/rollback")

    def delete_snapshot(self, vm: str, name: str) -> ActionResult:
        return self._act("DELETE", f"{_API}/vms/{_seg(vm)}/snapshots/{_seg(name)}")

    def clone_vm(self, vm: str, body: Mapping[str, Any]) -> ActionResult:
        """A new VM with full copies of `vm`'s disks and new MAC addresses."""
        return self._act("POST", f"{_API}/vms/{_seg(vm)}/clone", body)

    def instantiate_template(self, template: str, body: Mapping[str, Any]) -> ActionResult:
        """A new VM from a template (linked clones of its disks unless `full`)."""
        return self._act("POST", f"{_API}/templates/{_seg(template)}/instantiate", body)

    def delete_template(self, name: str, *, full_clones_first: bool = False) -> ApiObject:
        params = {"full_clones_first": "true"} if full_clones_first else None
        return self._object(self._send("DELETE", f"{_API}/templates/{_seg(name)}", params=params))

    # -- tasks -------------------------------------------------------------------------------

    def list_tasks(
        self,
        *,
        state: str | None = None,
        target: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        """One page of tasks; `target` is `kind/name`, e.g. `vm/web-1`."""
        params = _params(state=state, target=target, limit=limit, cursor=cursor)
        return self._page(f"{_API}/tasks", params)

    def iter_tasks(
        self, *, state: str | None = None, target: str | None = None, page_size: int | None = None
    ) -> Pager:
        """Every task matching the filters, page after page."""
        return self._pager(f"{_API}/tasks", _params(state=state, target=target, limit=page_size))

    def get_task(self, task_id: str) -> ApiObject:
        """One task; NotFound if the id is unknown (or the task has expired)."""
        return self._get(f"{_API}/tasks/{_seg(task_id)}")

    def wait_task(
        self,
        task_id: str,
        *,
        timeout: float | None = None,
        on_progress: Callable[[ApiObject], None] | None = None,
        poll_interval: float = 0.5,
    ) -> ApiObject:
        """Poll `GET /tasks/{id}` until the task is succeeded, failed or cancelled; return it.

        `on_progress` gets the task after every poll, the final one included. A failed or
        cancelled task is returned, not raised: the caller decides. Raises TaskWaitTimeout when
        `timeout` seconds pass first (the task goes on), NotFound if the task is unknown, and
        Unavailable only after several consecutive failed polls.
        """
        deadline = None if timeout is None else self._clock() + timeout
        last: ApiObject | None = None
        failures = 0
        while True:
            pause = poll_interval
            try:
                task = self.get_task(task_id)
            except Unavailable as exc:
                failures += 1
                if failures > _MAX_UNAVAILABLE_POLLS or (
                    deadline is not None and self._clock() >= deadline
                ):
                    raise
                pause = max(poll_interval, exc.retry_after or 0.0)
            else:
                failures = 0
                last = task
                if on_progress is not None:
                    on_progress(task)
                if task_state(task) in TASK_FINAL_STATES:
                    return task
            now = self._clock()
            if deadline is not None:
                if now >= deadline:
                    raise TaskWaitTimeout(task_id, cast(float, timeout), last)
                pause = min(pause, deadline - now)
            self._sleep(pause)
