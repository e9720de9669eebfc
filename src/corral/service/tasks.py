"""Task use-cases: list, get, wait, cancel, and building a new task record."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from corral.control.tasks import steps_for
from corral.errors import CorralError, ValidationFailed
from corral.model import Target, Task, TaskSpec, TaskStatus, utcnow
from corral.model.common import new_time_id
from corral.service.context import RequestMeta, ServiceContext
from corral.state import Objects
from corral.state.store import make_cursor

__all__ = ["TaskService", "new_task"]


def new_task(
    ctx: ServiceContext, meta: RequestMeta, action: str, vm: str, params: dict[str, Any]
) -> Task:
    now = utcnow()
    task_id = new_time_id()
    steps = steps_for(action)
    steps[0].state = "done"
    steps[0].started_at = steps[0].finished_at = now
    return Task(
        name=task_id,
        id=task_id,
        created_at=now,
        updated_at=now,
        spec=TaskSpec(action=action, target=Target(kind="vm", name=vm), params=params),
        status=TaskStatus(
            state="pending",
            step="accepted",
            steps=steps,
            progress=round(1 / len(steps), 3),
        ),
        actor=meta.actor,
        request_id=meta.request_id,
        trace_id=meta.trace_id,
        deadline_at=now + timedelta(seconds=ctx.settings.task_timeout_s),
    )


@dataclass(frozen=True)
class TaskList:
    items: list[Task]
    next_cursor: str | None
    revision: int


class TaskService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def get(self, task_id: str) -> Task:
        return await self.ctx.objects.get(Task, task_id)

    async def list(
        self,
        *,
        limit: int,
        cursor: str | None,
        state: str | None = None,
        target: str | None = None,
        stale: bool = False,
    ) -> TaskList:
        target_kind = target_name = None
        if target:
            target_kind, sep, target_name = target.partition("/")
            if not sep or not target_name:
                raise ValidationFailed.one("target", "format", "must look like vm/NAME")

        def keep(t: Task) -> bool:
            if state and t.status.state != state:
                return False
            return not target or (t.spec.target.kind, t.spec.target.name) == (
                target_kind,
                target_name,
            )

        items: list[Task] = []
        nxt = cursor
        revision = 0
        while True:
            page = await self.ctx.objects.list(Task, limit=limit, cursor=nxt, serializable=stale)
            revision = revision or page.revision
            for t in page.items:
                if keep(t):
                    items.append(t)
                    if len(items) == limit:
                        more = t is not page.items[-1] or page.next_cursor is not None
                        key = Objects.key(Task, t.name)
                        return TaskList(
                            items, make_cursor(revision, key) if more else None, revision
                        )
            nxt = page.next_cursor
            if nxt is None:
                return TaskList(items, None, revision)

    async def wait(self, task_id: str, timeout_s: float) -> Task:
        """Return the task once it has ended, or as it is when ``timeout_s`` passes."""
        task = await self.get(task_id)
        if task.final or timeout_s <= 0:
            return task
        key = Objects.key(Task, task_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not task.final:
                    try:
                        async for event in self.ctx.store.watch(key, task.mod_revision):
                            if event.type == "put" and event.kv.key == key:
                                task = Objects.decode(Task, event.kv)
                                if task.final:
                                    break
                    except CorralError:
                        await asyncio.sleep(0.5)
                        task = await self.get(task_id)
        return task
