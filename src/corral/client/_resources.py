"""Shapes of the corral REST API v1 as the client hands them out, and helpers around them.

Objects are exactly the JSON the server sent, as plain dicts (`ApiObject`): the client does
not model fields, so a newer server's extra fields pass through untouched. Only the envelopes
the client itself relies on (`Page`, `ActionResult`) are typed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypedDict
from urllib.parse import urlsplit, urlunsplit

from corral.client.errors import ApiError

__all__ = [
    "DEFAULT_ADDR",
    "DEFAULT_PORT",
    "TASK_FINAL_STATES",
    "VM_ACTIONS",
    "ActionResult",
    "ApiObject",
    "Page",
    "Pager",
    "if_match_value",
    "normalize_addr",
    "task_state",
]

DEFAULT_PORT = 8700
DEFAULT_ADDR = f"http://127.0.0.1:{DEFAULT_PORT}"

TASK_FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
"""A task in one of these states never changes again."""

VM_ACTIONS = ("start", "stop", "reboot")
"""The VM verbs of `POST /api/v1/vms/{name}/<verb>` this client and the CLI offer."""

ApiObject = dict[str, Any]
"""One API object (`kind`, `name`, `id`, `spec`, `status`, revisions, times), as sent."""


class Page(TypedDict):
    """One page of a list: `next_cursor` is None on the last page."""

    items: list[ApiObject]
    next_cursor: str | None
    revision: int


class ActionResult(TypedDict):
    """What create, delete and actions return: the object and the task doing the work.

    `object` is None once a waited-for delete has removed the object. `task` is None when the
    server had nothing to do on a host (it answered 201 or 200 with the object alone).
    """

    object: ApiObject | None
    task: ApiObject | None


def task_state(task: ApiObject) -> str:
    """The task's `status.state`, or "unknown" when the server sent none."""
    status = task.get("status")
    if isinstance(status, dict):
        return str(status.get("state") or "unknown")
    return "unknown"


def normalize_addr(addr: str) -> str:
    """The base URL for an address given as `host`, `host:port` or `http(s)://host[:port]`.

    Without a scheme, `http://` is assumed and so is port 8700 when none is given; with an
    explicit scheme the URL is kept as written (a proxy may serve corral on 443 or under a
    path). A trailing slash is dropped. Raises ValueError saying what is wrong.
    """
    text = addr.strip()
    if not text:
        raise ValueError("the address is empty; give host:port or http://host:port")
    explicit_scheme = "://" in text
    parts = urlsplit(text if explicit_scheme else f"http://{text}")
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{addr!r} uses {parts.scheme!r}; corral speaks http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{addr!r} has no host; give host:port or http://host:port")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{addr!r} has an invalid port") from None
    if parts.query or parts.fragment:
        raise ValueError(f"{addr!r} must not have a query or fragment")
    netloc = parts.netloc
    if port is None and not explicit_scheme:
        netloc = f"{netloc}:{DEFAULT_PORT}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def if_match_value(revision: int | str) -> str:
    """The If-Match header for a `mod_revision`: `40` and `"40"` both give `"40"`."""
    text = str(revision).strip()
    if text.startswith(('"', 'W/"')):
        return text
    return f'"{text}"'


class Pager(Iterator[ApiObject]):
    """Iterates over every object of a list, fetching the next page only when needed.

    `revision` is the list revision of the first page (None before the first fetch): a watch
    started after it misses nothing. `pages` counts the pages fetched so far. Raises whatever
    fetching a page raises (an `ApiError`), and `ApiError` if the server repeats a cursor.
    """

    def __init__(self, fetch: Callable[[str | None], Page]) -> None:
        self._fetch = fetch
        self._buffer: deque[ApiObject] = deque()
        self._cursor: str | None = None
        self._seen_cursors: set[str] = set()
        self._done = False
        self.revision: int | None = None
        self.pages = 0

    def __iter__(self) -> Pager:
        return self

    def __next__(self) -> ApiObject:
        while not self._buffer:
            if self._done:
                raise StopIteration
            self._load_page()
        return self._buffer.popleft()

    def _load_page(self) -> None:
        page = self._fetch(self._cursor)
        self.pages += 1
        if self.revision is None:
            self.revision = page["revision"]
        self._buffer.extend(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            self._done = True
            return
        if cursor in self._seen_cursors:
            raise ApiError(f"the server returned cursor {cursor!r} twice; stopping the listing")
        self._seen_cursors.add(cursor)
        self._cursor = cursor
