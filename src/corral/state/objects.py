"""Typed access to stored objects: the codec and the key layout over the raw store."""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from corral.errors import Conflict, NotFound
from corral.model import Group, Image, Node, Pool, Task, Token, Vm, Volume
from corral.model.common import ObjectMeta, utcnow
from corral.model.migration import Migration
from corral.model.snapshot import VmSnapshot
from corral.model.template import Template
from corral.state import keys
from corral.state.codec import decode, encode
from corral.state.store import KV, Delete, Expect, Put, Store

__all__ = ["ObjectPage", "Objects", "kind_of"]

ObjT = TypeVar("ObjT", bound=ObjectMeta)

# model -> (key kind, record kind)
_KINDS: dict[type[ObjectMeta], tuple[str, str]] = {
    Vm: ("vms", "vm"),
    Node: ("nodes", "node"),
    Task: ("tasks", "task"),
    Token: ("tokens", "token"),
    Pool: ("pools", "pool"),
    Volume: ("volumes", "volume"),
    Image: ("images", "image"),
    VmSnapshot: ("snapshots", "snapshot"),
    Template: ("templates", "template"),
    Migration: ("migrations", "migration"),
    Group: ("groups", "group"),
}


def kind_of(model: type[ObjectMeta]) -> tuple[str, str]:
    return _KINDS[model]


@dataclass(frozen=True)
class ObjectPage(Generic[ObjT]):
    items: list[ObjT]
    next_cursor: str | None
    revision: int


class Objects:
    """Read, list, encode and update typed objects. Every write is one ``store.commit``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def key(model: type[ObjectMeta], name: str) -> str:
        return keys.object_key(kind_of(model)[0], name)

    @staticmethod
    def decode(model: type[ObjT], kv: KV) -> ObjT:
        return decode(
            kind_of(model)[1],
            kv.value,
            model,
            create_revision=kv.create_revision,
            mod_revision=kv.mod_revision,
        )

    @staticmethod
    def put(obj: ObjectMeta, lease: int = 0) -> Put:
        model = type(obj)
        return Put(Objects.key(model, obj.name), encode(kind_of(model)[1], obj), lease)

    @staticmethod
    def delete(model: type[ObjectMeta], name: str) -> Delete:
        return Delete(Objects.key(model, name))

    @staticmethod
    def expect_unchanged(obj: ObjectMeta) -> Expect:
        return Expect(Objects.key(type(obj), obj.name), mod_revision=obj.mod_revision)

    @staticmethod
    def expect_missing(model: type[ObjectMeta], name: str) -> Expect:
        return Expect.missing(Objects.key(model, name))

    async def find(
        self, model: type[ObjT], name: str, *, serializable: bool = False
    ) -> ObjT | None:
        kv = await self.store.get(self.key(model, name), serializable=serializable)
        return None if kv is None else self.decode(model, kv)

    async def get(self, model: type[ObjT], name: str, *, serializable: bool = False) -> ObjT:
        found = await self.find(model, name, serializable=serializable)
        if found is None:
            raise NotFound(f"{kind_of(model)[1]} {name!r} not found")
        return found

    async def list(
        self,
        model: type[ObjT],
        *,
        limit: int = 0,
        cursor: str | None = None,
        serializable: bool = False,
    ) -> ObjectPage[ObjT]:
        page = await self.store.list(
            _prefix(model), limit=limit, cursor=cursor, serializable=serializable
        )
        return ObjectPage(
            items=[self.decode(model, kv) for kv in page.items],
            next_cursor=page.next_cursor,
            revision=page.revision,
        )

    async def all(
        self, model: type[ObjT], *, serializable: bool = False
    ) -> tuple[builtins.list[ObjT], int]:
        items, revision = await self.store.list_all(_prefix(model), serializable=serializable)
        return [self.decode(model, kv) for kv in items], revision

    async def update(
        self,
        model: type[ObjT],
        name: str,
        change: Callable[[ObjT], ObjT | None],
        *,
        expect: Sequence[Expect] = (),
        extra_ops: Callable[[ObjT], Sequence[Put | Delete]] | None = None,
        attempts: int = 8,
    ) -> ObjT | None:
        """Read-modify-write with compare-and-swap, retrying on concurrent changes.

        ``change`` gets a fresh copy and returns the new object, or None to write nothing.
        ``expect`` adds compares (a leadership fence) that are not retried: if one of them is
        what failed, the Conflict propagates. Returns the object as written (or None).
        """
        for _ in range(attempts):
            current = await self.get(model, name)
            changed = change(current.model_copy(deep=True))
            if changed is None:
                return None
            changed.updated_at = utcnow()
            ops: builtins.list[Put | Delete] = [self.put(changed)]
            if extra_ops is not None:
                ops.extend(extra_ops(changed))
            try:
                rev = await self.store.commit(ops, [self.expect_unchanged(current), *expect])
            except Conflict:
                if expect and not await self._fences_hold(expect):
                    raise
                continue
            changed.mod_revision = rev
            return changed
        raise Conflict(f"{kind_of(model)[1]} {name!r} kept changing; try again")

    async def _fences_hold(self, expect: Sequence[Expect]) -> bool:
        found, _ = await self.store.get_many([e.key for e in expect])
        for e in expect:
            kv = found.get(e.key)
            if e.create_revision is not None:
                if (kv.create_revision if kv else 0) != e.create_revision:
                    return False
            elif (kv.mod_revision if kv else 0) != (e.mod_revision or 0):
                return False
        return True


def _prefix(model: type[ObjectMeta]) -> str:
    """The key prefix of every record of ``model``'s kind."""
    return keys.kind_prefix(kind_of(model)[0])
