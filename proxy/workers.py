"""What several proxy workers share (`workers:`; each worker is one process with one event loop).

The daemon starts `workers` proxy processes; each listens on the same ports with SO_REUSEPORT
and the kernel spreads new connections (and DNS datagrams, by their 4-tuple) over them. Holds,
grants and the record are in the recorder's SQLite database already. What else must hold
across workers lives in memory (`shared_dir`: a root-only directory on /dev/shm per instance,
made afresh by the daemon at start, `reset`, and removed by `interlock down`):

- names.db: the per-agent name bindings (proxy/gate.py NameBindings). A name one worker's
  resolver bound is committed before the agent gets the answer, and every worker reads new
  bindings before it judges a connection (`SharedNames.pull`; names-version, a counter bumped
  after each commit, says whether there are any).
- policy-generation: bumped by the worker that loads a new policy; the others load it before
  their next decision (proxy/gate.py PolicyHolder).
- conns: per-agent open-connection counts, one row of counters per worker in a shared file,
  updated under an exclusive flock so `max_connections_per_agent` bounds an agent's connections
  through all workers together (`SharedCounts`). A worker that dies has its row zeroed by its
  successor: the kernel closed its connections with it.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import shutil
import sqlite3
import stat
import struct
import time
from pathlib import Path

SLOTS = 65536  # per-agent counters per worker, indexed by agent id modulo SLOTS
_I32 = struct.Struct("=i")
_I64 = struct.Struct("=q")
_F64 = struct.Struct("=d")


def shared_dir(run_dir: Path) -> Path:
    """Where an instance's workers keep what they share: on /dev/shm (memory), never on the
    recorder's disk, so a full disk costs the record and nothing else; one directory per run dir."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return run_dir
    return shm / f"interlock-{hashlib.sha256(str(run_dir.absolute()).encode()).hexdigest()[:16]}"


def names_db(run_dir: Path) -> Path:
    return shared_dir(run_dir) / "names.db"


def counts_file(run_dir: Path) -> Path:
    return shared_dir(run_dir) / "conns"


def generation_file(run_dir: Path) -> Path:
    return shared_dir(run_dir) / "policy-generation"


def names_version_file(run_dir: Path) -> Path:
    return shared_dir(run_dir) / "names-version"


def commit_hold_file(run_dir: Path) -> Path:
    return shared_dir(run_dir) / "commit-hold"


def spool_trip_file(run_dir: Path) -> Path:
    return shared_dir(run_dir) / "spool-tripped"


def metrics_file(run_dir: Path, worker: int) -> Path:
    return shared_dir(run_dir) / f"metrics-{worker}.prom"


def remove(run_dir: Path) -> None:
    """The shared state of an instance that is coming down."""
    d = shared_dir(run_dir)
    if d != run_dir:
        _clear(d)


def _clear(d: Path) -> None:
    """Remove whatever is at `d` without following it: a symlink or file an agent planted there
    (in world-writable /dev/shm) is unlinked, never taken for our directory."""
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(d, ignore_errors=True)
    else:
        d.unlink(missing_ok=True)


def _make_private_dir(d: Path, attempts: int = 20) -> None:
    """Create `d` ourselves (mkdir, no exist_ok): in sticky /dev/shm nobody else can then rename or
    remove it. Whatever someone else put there first is cleared; still losing the race after
    `attempts` tries is an error (the daemon does not start: fail closed)."""
    for _ in range(attempts):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            _clear(d)
            continue
        os.chmod(d, 0o700)  # mkdir's mode is masked by the umask; no more than 0700 either way
        return
    raise OSError(f"{d}: something keeps re-creating it; the workers' shared state needs a directory only root can use")


def reset(run_dir: Path, workers: int) -> None:
    """Fresh shared state for a new group of workers (the daemon, before it starts them)."""
    d = shared_dir(run_dir)
    if d == run_dir:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    else:
        _make_private_dir(d)
    for suffix in ("", "-wal", "-shm"):
        Path(str(names_db(run_dir)) + suffix).unlink(missing_ok=True)
    fd = os.open(counts_file(run_dir), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, max(1, workers) * SLOTS * _I32.size)
    finally:
        os.close(fd)
    for counter in (generation_file(run_dir), names_version_file(run_dir), commit_hold_file(run_dir),
                    spool_trip_file(run_dir)):
        fd = os.open(counter, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, _I64.size)
        finally:
            os.close(fd)
    conn = _names_connect(names_db(run_dir))
    conn.close()
    os.chmod(names_db(run_dir), 0o600)


def _names_connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=10, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")  # bindings die with the worker group: nothing to keep
    conn.execute("CREATE TABLE IF NOT EXISTS bindings (seq INTEGER PRIMARY KEY, agent TEXT, address TEXT,"
                 " name TEXT, until REAL)")
    return conn


class SharedNames:
    """The name bindings all workers see: rows (agent, address, name, until) in names.db, where
    `until` is on CLOCK_MONOTONIC, which every process on the host shares. A counter next to it
    moves after every commit, so a worker that finds it unchanged reads nothing (no SQL on the
    per-connection path)."""

    PRUNE_EVERY = 1024  # binds between deletions of expired rows

    def __init__(self, path: Path, version: Path):
        self.conn = _names_connect(path)
        self.seen = 0  # the highest seq merged
        self.version = SharedGeneration(version)
        self.pulled: int | None = None  # the counter at the last pull
        self.binds = 0

    def push(self, agent: str, address: str, name: str, until: float) -> None:
        """Commit one binding: visible to every worker when this returns (raises sqlite3.Error)."""
        self.conn.execute("INSERT INTO bindings (agent, address, name, until) VALUES (?,?,?,?)",
                          (agent, address, name, until))
        self.version.bump()  # after the commit: a reader that sees the new value sees the row
        self.binds += 1
        if self.binds % self.PRUNE_EVERY == 0:
            self.conn.execute("DELETE FROM bindings WHERE until < ?", (time.monotonic(),))

    def pull(self) -> list[tuple[str, str, str, float]]:
        """Bindings committed since the last pull (by any worker, this one included)."""
        version = self.version.value
        if version == self.pulled:
            return []
        self.pulled = version
        rows = self.conn.execute("SELECT seq, agent, address, name, until FROM bindings WHERE seq > ? ORDER BY seq",
                                 (self.seen,)).fetchall()
        if rows:
            self.seen = rows[-1][0]
        return [r[1:] for r in rows]


class SharedCounts:
    """Per-agent open connections summed over every worker, checked and bumped atomically."""

    def __init__(self, path: Path, worker: int, workers: int):
        self.fd = os.open(path, os.O_RDWR)
        size = os.fstat(self.fd).st_size
        if size < workers * SLOTS * _I32.size or not 0 <= worker < workers:
            os.close(self.fd)
            raise ValueError(f"{path}: sized for {size // (SLOTS * _I32.size)} workers, not worker {worker} of {workers}")
        self.map = mmap.mmap(self.fd, workers * SLOTS * _I32.size)
        self.cells = memoryview(self.map).cast("i")
        self.worker, self.workers = worker, workers
        with self._locked():
            self.cells[worker * SLOTS:(worker + 1) * SLOTS] = memoryview(bytes(SLOTS * _I32.size)).cast("i")

    def _locked(self):
        return _Flock(self.fd)

    def total(self, agent_id: int) -> int:
        slot = agent_id % SLOTS
        return sum(self.cells[w * SLOTS + slot] for w in range(self.workers))

    def admit(self, agent_id: int, cap: int) -> bool:
        """Count one more connection for the agent unless all workers together hold cap already."""
        slot = agent_id % SLOTS
        with self._locked():
            if cap and self.total(agent_id) >= cap:
                return False
            self.cells[self.worker * SLOTS + slot] += 1
        return True

    def release(self, agent_id: int) -> None:
        """This worker's row has one writer (it): no lock needed to give a connection back."""
        i = self.worker * SLOTS + agent_id % SLOTS
        if self.cells[i] > 0:
            self.cells[i] -= 1

    def close(self) -> None:
        self.cells.release()
        self.map.close()
        os.close(self.fd)


class SharedGeneration:
    """How many policies the workers have loaded, and the text of the last: a worker that sees it move loads that text."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(self.fd, _I64.size)
        self.cell = memoryview(self.map).cast("q")
        self.text_path = Path(f"{path}.policy")  # the text the last bump validated (run dir, root only)

    def publish(self, text: str) -> int:
        """Make `text` (already validated) the policy every worker follows; return the new generation.

        Followers load this text, not the file: the file may have changed (even to something invalid)
        since, and a follower must never stay on the policy its sibling replaced."""
        with _Flock(self.fd):
            tmp = self.text_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.text_path)
            self.cell[0] += 1
            return self.cell[0]

    def published(self) -> str | None:
        """The text of the last `publish`, or None if none was published."""
        with _Flock(self.fd):
            try:
                return self.text_path.read_text(encoding="utf-8")
            except OSError:
                return None

    @property
    def value(self) -> int:
        return self.cell[0]

    def bump(self) -> int:
        with _Flock(self.fd):
            self.cell[0] += 1
            return self.cell[0]


class SharedStamp:
    """One CLOCK_MONOTONIC time (shared by every process on the host) in eight bytes of shared
    memory, written whole by one worker and read by every worker without a lock."""

    def __init__(self, path: Path):
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, _F64.size)
        finally:
            os.close(fd)
        self.cell = memoryview(self.map).cast("d")

    def get(self) -> float:
        return self.cell[0]

    def set(self, at: float) -> None:
        self.cell[0] = at


class SharedHold(SharedStamp):
    """recorder.store.CommitHold for workers writing one database: the deadline the checkpointing
    worker sets, read by every worker's writer before each commit."""

    until = SharedStamp.get


class _Flock:
    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
