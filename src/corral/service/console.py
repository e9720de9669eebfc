"""A VM's serial console output (the last bytes of it), wherever the VM runs.

The host that runs the VM reads its console log itself; any other server forwards the request
to that host's API with ``local=true``. Nothing here talks to the hypervisor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx

from corral.errors import NotFound, Unavailable
from corral.model import Node, Vm
from corral.service.context import ServiceContext

__all__ = ["ConsoleService", "LocalConsole"]

# Reads up to N trailing bytes of a VM's console on this host; None if it has no console here.
LocalConsole = Callable[[str, int], Awaitable[bytes | None]]


class ConsoleService:
    def __init__(self, ctx: ServiceContext, node: str, local: LocalConsole) -> None:
        self.ctx = ctx
        self.node = node
        self.local = local

    async def tail(self, name: str, max_bytes: int, *, local_only: bool = False) -> bytes:
        """The last ``max_bytes`` of the VM's console. NotFound when there is none."""
        if local_only:
            return await self._read_here(name, max_bytes)
        vm = await self.ctx.objects.get(Vm, name)
        host = vm.status.node
        if host is None:
            raise NotFound(f"vm {name!r} has not been placed on a host yet, so it has no console")
        if host == self.node:
            return await self._read_here(name, max_bytes)
        node = await self.ctx.objects.get(Node, host)
        url = f"{node.status.address.rstrip('/')}/api/v1/vms/{name}/console/log"
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                resp = await client.get(url, params={"bytes": max_bytes, "local": "true"})
        except httpx.HTTPError as exc:
            raise Unavailable(
                f"host {host} (which runs vm {name!r}) did not answer: {exc}"
            ) from exc
        if resp.status_code == 404:
            raise NotFound(resp.json().get("detail", f"no console for vm {name!r} on {host}"))
        if resp.status_code != 200:
            raise Unavailable(f"host {host} answered {resp.status_code} for vm {name!r}'s console")
        return resp.content

    async def _read_here(self, name: str, max_bytes: int) -> bytes:
        data = await self.local(name, max_bytes)
        if data is None:
            raise NotFound(
                f"vm {name!r} has no console log on host {self.node} (not defined here, or its "
                "driver has no serial console, e.g. the fake driver)"
            )
        return data
