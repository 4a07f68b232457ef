"""One writer at a time: a lease in a key-value store, taken with a conditional write.

A writer (an extraction into a store, a training run into its folder) holds the key
`glp_writer.lock` under its root. The key names the holder (host, pid, process start
time, what, when) and a heartbeat the holder refreshes every `GLP_LOCK_HEARTBEAT_S`
seconds (default 20). Every change is a tensorstore conditional write (`if_equal` on the
key's generation): local files, memory:// and buckets (gs:// ifGenerationMatch, s3://
If-Match) alike, so of two writers racing for a free or stale lock exactly one wins.

A lock is stale, and the next writer takes it over with a warning, when
  - its holder ran on this host and that process is gone (pid not running, or reused by a
    process that started later): a writer killed with kill -9 is replaced at once;
  - or its heartbeat is older than `GLP_LOCK_LEASE_S` seconds (default 120): the holder's
    machine died or lost the store.
A holder that finds its lease taken (its heartbeat write fails its condition, or it could
not refresh for a whole lease) raises WriterLockLostError at its next `check()`, before
writing more. Readers never touch the lock. Release deletes the key with a condition;
on s3://, whose deletes carry none, it overwrites the key with RELEASED instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import uuid

from glp_jax.errors import GLPError, WriterLockedError, WriterLockLostError, warn

LOCK_KEY = "glp_writer.lock"
# What a released lock holds on s3://, where deletes carry no condition (tensorstore sends a
# checked HEAD, then a plain DELETE): a conditional PUT of this marker releases atomically.
RELEASED = b"released\n"


def heartbeat_s() -> float:
    return float(os.environ.get("GLP_LOCK_HEARTBEAT_S", "20"))


def lease_s() -> float:
    return float(os.environ.get("GLP_LOCK_LEASE_S", "120"))


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), None elsewhere or
    when it does not exist: with the pid it identifies a process even after pid reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def pid_running(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie (killed, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except (OSError, IndexError):
        return True


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written in the lock key."""

    what: str
    host: str
    pid: int
    pid_start: str | None
    started: float
    heartbeat: float
    lease_s: float
    token: str

    @staticmethod
    def me(what: str, token: str) -> Holder:
        now = time.time()
        return Holder(what, socket.gethostname(), os.getpid(), process_start(os.getpid()), now,
                      now, lease_s(), token)

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @staticmethod
    def from_bytes(raw: bytes) -> Holder:
        obj = json.loads(raw)
        return Holder(**{k: obj[k] for k in Holder.__dataclass_fields__})

    def describe(self, now: float | None = None) -> str:
        age = (now or time.time()) - self.heartbeat
        return (f"{self.what} (pid {self.pid} on host {self.host}, started {_utc(self.started)}, "
                f"last heartbeat {age:.0f} s ago)")

    def gone(self, now: float | None = None) -> str | None:
        """Why this holder is certainly gone (its lock may be taken over), or None."""
        now = now or time.time()
        if self.host == socket.gethostname():
            if not pid_running(self.pid):
                return "that process is no longer running"
            start = process_start(self.pid)
            if self.pid_start and start and start != self.pid_start:
                return "that process is no longer running (its pid now belongs to another one)"
        if now - self.heartbeat > self.lease_s:
            return f"its heartbeat stopped {now - self.heartbeat:.0f} s ago (lease {self.lease_s:.0f} s)"
        return None


class WriterLock:
    """`with WriterLock(url, "glp extract"):` holds the writer lock of the store or run at
    `url` (a local folder or a kvstore URL) for the block; `check()` before each commit."""

    def __init__(self, url: str, what: str):
        self.url, self.what = str(url), what
        self._token = uuid.uuid4().hex
        self._gen: bytes | None = None
        self._last_beat = 0.0
        self._lost: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _kv(self):
        from glp_jax.kv import open_kvstore

        if not hasattr(self, "_kvstore"):
            try:
                self._kvstore = open_kvstore(self.url)
            except ValueError as e:
                raise GLPError(f"cannot open {self.url} to take its writer lock "
                               f"({str(e).splitlines()[0][:200]})") from None
        return self._kvstore

    @property
    def held(self) -> bool:
        return self._gen is not None

    def acquire(self) -> WriterLock:
        kv = self._kv()
        for _ in range(8):
            try:
                found = kv.read(LOCK_KEY).result()
            except ValueError as e:
                raise GLPError(f"cannot read the writer lock of {self.url} "
                               f"({str(e).splitlines()[0][:200]}); check the path and its "
                               f"permissions") from None
            previous, why = None, None
            if found.state == "value" and found.value != RELEASED:
                try:
                    previous = Holder.from_bytes(found.value)
                    why = previous.gone()
                except (ValueError, KeyError, TypeError):
                    why = "the lock key is unreadable"
                if why is None:
                    raise WriterLockedError(
                        f"{self.url} is being written by {previous.describe()}; a second writer "
                        f"would corrupt it. Wait for it to finish or stop it (if its machine is "
                        f"gone, the lock is taken over {previous.lease_s:.0f} s after its last "
                        f"heartbeat)")
            me = Holder.me(self.what, self._token)
            try:
                stamp = kv.write(LOCK_KEY, me.to_bytes(), if_equal=found.stamp.generation).result()
            except ValueError as e:
                raise GLPError(f"cannot write the writer lock of {self.url} "
                               f"({str(e).splitlines()[0][:200]}); check that it is writable") from None
            if stamp.generation:  # our condition held: the lock is ours
                self._gen, self._last_beat, self._me = stamp.generation, me.heartbeat, me
                if found.state == "value" and found.value != RELEASED:
                    who = previous.describe() if previous else "an unknown writer"
                    warn(f"took over the writer lock of {self.url} from {who}: {why}")
                self._start_heartbeat()
                return self
        raise WriterLockedError(f"{self.url}: could not take the writer lock (other writers keep "
                                f"taking it); another writer is starting, try again later")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"glp-lock-{self.what}",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_s()):
            self.refresh()

    def refresh(self) -> None:
        """Rewrite our heartbeat if the lock is still ours; note it when it is not."""
        with self._mutex:
            if self._gen is None or self._lost:
                return
            me = dataclasses.replace(self._me, heartbeat=time.time())
            try:
                stamp = self._kv().write(LOCK_KEY, me.to_bytes(), if_equal=self._gen).result()
            except ValueError:  # a transient storage error: try again next beat
                return
            if stamp.generation:
                self._gen, self._last_beat, self._me = stamp.generation, me.heartbeat, me
            else:
                now = self._kv().read(LOCK_KEY).result()
                try:
                    self._lost = Holder.from_bytes(now.value).describe()
                except (ValueError, KeyError, TypeError):
                    self._lost = "another writer (or it was deleted)"

    def check(self) -> None:
        """Raise WriterLockLostError if another writer may have taken the lock."""
        if self._gen is None:
            return
        if self._lost is None and time.time() - self._last_beat > lease_s():
            self._lost = f"nobody (no heartbeat could be written for {lease_s():.0f} s)"
        if self._lost:
            raise WriterLockLostError(
                f"{self.what} lost the writer lock of {self.url} to {self._lost}; stopped "
                f"before writing more (what was committed before is intact). Make sure only "
                f"one writer uses it, then rerun to resume")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            if self._gen is not None and not self._lost:
                freed = RELEASED if self.url.startswith("s3://") else None
                try:
                    self._kv().write(LOCK_KEY, freed, if_equal=self._gen).result()
                except ValueError:
                    pass  # unreachable storage: the lease expires by itself
            self._gen = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_holder(url: str) -> Holder | None:
    """Who holds the writer lock of `url` now (None: nobody)."""
    from glp_jax.kv import open_kvstore

    found = open_kvstore(url).read(LOCK_KEY).result()
    if found.state != "value" or found.value == RELEASED:
        return None
    try:
        return Holder.from_bytes(found.value)
    except (ValueError, KeyError, TypeError):
        return None
