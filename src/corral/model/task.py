"""Long-running work, recorded so it survives restarts and leader changes."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.model.common import ObjectMeta

__all__ = ["FINAL_TASK_STATES", "Step", "Target", "Task", "TaskSpec", "TaskState", "TaskStatus"]

TaskState = Literal["pending", "running", "succeeded", "failed", "cancelled"]
StepState = Literal["pending", "running", "done", "failed", "skipped"]
FINAL_TASK_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str
    name: str


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: str
    target: Target
    params: dict[str, Any] = Field(default_factory=dict)


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    state: StepState = "pending"
    started_at: datetime | None = None
    finished_at: datetime | None = None


class TaskStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: TaskState = "pending"
    progress: float = 0.0
    step: str = ""
    steps: list[Step] = Field(default_factory=list)
    result: dict[str, Any] | None = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class Task(ObjectMeta):
    """A task; its ``name`` is its ``id``."""

    kind: Literal["task"] = "task"
    spec: TaskSpec
    status: TaskStatus = Field(default_factory=TaskStatus)
    actor: str = "anonymous"
    request_id: str = ""
    trace_id: str = ""
    deadline_at: datetime | None = None
    # Set by ``POST /api/v1/tasks/{id}/cancel`` on tasks that can stop part-way (drain,
    # rebalance); the loop running the task ends it as ``cancelled``.
    cancel_requested: bool = False

    @property
    def final(self) -> bool:
        return self.status.state in FINAL_TASK_STATES
