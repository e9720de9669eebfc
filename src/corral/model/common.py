"""Shared value types: names, labels, timestamps and the envelope every object wears."""

from __future__ import annotations

import os
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = [
    "DNS_LABEL_RE",
    "Labels",
    "Name",
    "ObjectMeta",
    "Strict",
    "new_id",
    "new_time_id",
    "parse_label_selector",
    "rfc3339",
    "utcnow",
]

DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_./]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
MAX_LABELS = 64

NAME_RULE = (
    "must be a DNS label: 1-63 lower-case letters, digits or '-', "
    "starting and ending with a letter or digit"
)


def _check_name(value: str) -> str:
    if not DNS_LABEL_RE.match(value):
        raise ValueError(NAME_RULE)
    return value


def _check_labels(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels")
    for key, val in value.items():
        if not _LABEL_KEY_RE.match(key):
            raise ValueError(
                f"label key {key[:80]!r} must be 1-63 letters, digits, '-', '_', '.' or '/', "
                "starting and ending with a letter or digit"
            )
        if not _LABEL_VALUE_RE.match(val):
            raise ValueError(
                f"label {key!r} value {val[:80]!r} must be at most 63 letters, digits, '-', '_' "
                "or '.', starting and ending with a letter or digit"
            )
    return value


Name = Annotated[str, Field(max_length=63), AfterValidator(_check_name)]
Labels = Annotated[dict[str, str], AfterValidator(_check_labels)]


class Strict(BaseModel):
    """Base of request bodies and specs: unknown fields are errors, types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=False)


class ObjectMeta(BaseModel):
    """The envelope of every stored object (api.md): identity, revisions and times."""

    model_config = ConfigDict(extra="forbid")

    name: str
    id: str
    create_revision: int = 0
    mod_revision: int = 0
    created_at: datetime
    updated_at: datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def new_id() -> str:
    return str(uuid.uuid4())


def new_time_id() -> str:
    """A UUIDv7 (RFC 9562): ids sort by creation time, so task lists come out in order.

    Written here because Python 3.11's uuid module has no uuid7.
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | (rand >> 66 & 0xFFF) << 64
    value |= 0b10 << 62 | rand & (2**62 - 1)
    return str(uuid.UUID(int=value))


def parse_label_selector(selector: str) -> list[tuple[str, str, str]]:
    """Parse ``tier=web,env!=prod,gpu`` into ``[(key, op, value)]``.

    ``op`` is ``=``, ``!=`` or ``exists``. Raises ValueError naming the bad term.
    """
    terms: list[tuple[str, str, str]] = []
    for raw in selector.split(","):
        term = raw.strip()
        if not term:
            continue
        if "!=" in term:
            key, _, val = term.partition("!=")
            op = "!="
        elif "=" in term:
            key, _, val = term.partition("=")
            key = key.rstrip("=")
            val = val.lstrip("=")
            op = "="
        else:
            key, val, op = term, "", "exists"
        key = key.strip()
        if not _LABEL_KEY_RE.match(key):
            raise ValueError(f"selector term {term!r}: bad label key")
        terms.append((key, op, val.strip()))
    return terms


def labels_match(labels: dict[str, str], terms: list[tuple[str, str, str]]) -> bool:
    """True when ``labels`` satisfy every selector term."""
    for key, op, val in terms:
        if op == "exists" and key not in labels:
            return False
        if op == "=" and labels.get(key) != val:
            return False
        if op == "!=" and labels.get(key) == val:
            return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7396 JSON merge patch and return the result (inputs are not changed)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
