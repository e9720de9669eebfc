"""Cluster state in etcd: key layout, record codec, the store and typed objects."""

from corral.state.objects import ObjectPage, Objects
from corral.state.store import KV, Compacted, Delete, Expect, Page, Put, Store, WatchEvent

__all__ = [
    "KV",
    "Compacted",
    "Delete",
    "Expect",
    "ObjectPage",
    "Objects",
    "Page",
    "Put",
    "Store",
    "WatchEvent",
]
