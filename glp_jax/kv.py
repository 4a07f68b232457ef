"""tensorstore key-value stores for local paths and bucket URLs: one spelling everywhere."""

from __future__ import annotations

import os

import tensorstore as ts

# memory:// stores live in a tensorstore Context; share one so re-opening in-process works.
_MEMORY_CONTEXT = ts.Context()


def kvstore_spec(url: str) -> str | dict:
    """A tensorstore kvstore spec for a local path or URL, with a trailing slash."""
    url = str(url)
    if "://" in url:
        return url.rstrip("/") + "/"
    return {"driver": "file", "path": os.path.abspath(url).rstrip("/") + "/"}


def child_spec(base: str | dict, name: str) -> str | dict:
    """The spec of folder `name` under `base`."""
    if isinstance(base, dict):
        return {**base, "path": base["path"] + name + "/"}
    return base + name + "/"


def context_for(url: str) -> ts.Context:
    """memory:// shares one context (so reopening sees the data); others cache nothing."""
    if str(url).startswith("memory://"):
        return _MEMORY_CONTEXT
    return ts.Context({"cache_pool": {"total_bytes_limit": 0}})


def open_kvstore(url: str) -> ts.KvStore:
    return ts.KvStore.open(kvstore_spec(url), context=context_for(url)).result()
