"""The local recorder: SQLite through sqlite-utils, one row per connection plus an event log.

The proxy writes through a group commit: writes queued during one turn of its event loop are
committed in one transaction at the end of the turn, with a future per write that needs it. The proxy
awaits that future before it acts on a connection, so a session row and its decision are on
disk before the first byte goes upstream, and refusals and holds are fsynced (synchronous=FULL)
before they take effect; many connections share one commit under load.

Recording is a precondition, not a side effect: when a write fails (disk full, I/O error,
read-only file system) the recorder enters a failed state, every write that something waits on
fails at once (the proxy refuses the agent), and every write is kept in a bounded backlog that is
committed, with a `recorder-failed` and a `recorder-recovered` event, as soon as the database can
be written again. `Health` is that state as status and metrics read it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import sqlite_utils

SESSION_COLUMNS = {
    "id": str, "agent": str, "pid": int, "tgid": int, "uid": int, "gid": int, "comm": str,
    "exe": str, "cmdline": str, "cgroup_id": int, "dst_addr": str, "dst_port": int,
    "family": str, "protocol": str, "started": float, "ended": float, "bytes_up": int,
    "bytes_down": int, "outcome": str, "detail": str, "verdict": str, "rule": str,
    "identity": str,  # the agent's verified OIDC identity (identity/agents.py record_json), NULL without
}
EVENT_COLUMNS = {"id": int, "at": float, "kind": str, "session": str, "data": str}

# Events an operator's log shows as well (logging, to stderr/journald; JSON with --log-format json),
# with their level. Per-operation events (decisions, statements, requests, DNS) stay in the
# recorder only: they are the audit trail, and logging them would tax the data path.
_events_log = logging.getLogger("interlock.events")
LOGGED_EVENTS = {
    "daemon-start": logging.INFO, "daemon-stop": logging.INFO, "proxy-start": logging.INFO,
    "proxy-exit": logging.WARNING, "policy-loaded": logging.INFO, "policy-rejected": logging.ERROR,
    "enrolled": logging.INFO, "unenrolled": logging.INFO, "enroll-refused": logging.WARNING,
    "control-refused": logging.WARNING,
    "lockdown": logging.CRITICAL, "tamper": logging.CRITICAL, "rearm": logging.WARNING,
    "inbound-refused": logging.WARNING,
    "watch-error": logging.ERROR, "recorder-failed": logging.CRITICAL, "recorder-recovered": logging.WARNING,
    "approval-requested": logging.INFO, "approval-approved": logging.INFO, "approval-denied": logging.INFO,
    "approval-expired": logging.INFO, "approval-granted": logging.INFO, "hold-canceled": logging.INFO,
    "ptrace-guard": logging.INFO, "ptrace-refused": logging.WARNING, "socket-refused": logging.WARNING,
    "selector-outside-scope": logging.WARNING,
}


_ID_POOL = 512  # session ids' random parts read from the kernel at once, not one getrandom per connection
_id_random: deque[str] = deque()


def _random_part() -> str:
    """Three random bytes as hex; deque.popleft is atomic, so threads never share one."""
    try:
        return _id_random.popleft()
    except IndexError:
        raw = os.urandom(3 * _ID_POOL).hex()
        _id_random.extend(raw[i:i + 6] for i in range(0, len(raw), 6))
        return _id_random.popleft()


os.register_at_fork(after_in_child=_id_random.clear)  # a forked child draws its own


def new_session_id(worker: int = 0) -> str:
    """Time-ordered ids sort sessions by start without a second column. The two hex digits
    before the last six name the proxy worker that opened it (`worker_of`), so a restarted
    worker closes out only its own dead sessions."""
    return f"{time.time_ns() // 1000:x}{worker & 0xFF:02x}{_random_part()}"


def worker_of(session_id: str) -> int:
    """The proxy worker a session id names (new_session_id)."""
    return int(session_id[-8:-6], 16)


@dataclass
class SessionRecord:
    id: str
    agent: str
    pid: int
    tgid: int
    uid: int
    gid: int
    comm: str
    exe: str
    cmdline: str
    cgroup_id: int
    dst_addr: str
    dst_port: int
    family: str
    protocol: str = "unknown"
    started: float = field(default_factory=time.time)
    ended: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    outcome: str = "open"
    detail: str = ""
    verdict: str = ""  # the connection's own decision, and the rule that made it
    rule: str = ""
    identity: str | None = None  # JSON: iss, sub, exp, claims of the agent's bound identity

    def row(self) -> tuple:
        """Column values in SESSION_COLUMNS order (dataclasses.astuple deep-copies: too slow here)."""
        return (self.id, self.agent, self.pid, self.tgid, self.uid, self.gid, self.comm, self.exe, self.cmdline,
                self.cgroup_id, self.dst_addr, self.dst_port, self.family, self.protocol, self.started, self.ended,
                self.bytes_up, self.bytes_down, self.outcome, self.detail, self.verdict, self.rule, self.identity)


class RecorderDown(Exception):
    """The recorder cannot write: whatever waited on this write must not take effect."""


class Unrecordable(Exception):
    """Recording must stop for a reason other than a failed write (the shipping spool is full,
    recorder/shipper.py): its message is the reason as status shows it."""


def describe(e: BaseException) -> str:
    """One line for an operator: SQLite's error name and message (e.g. 'SQLITE_FULL: database or disk is full')."""
    if isinstance(e, Unrecordable):
        return str(e)
    name = getattr(e, "sqlite_errorname", None)
    return f"{name}: {e}" if name else f"{type(e).__name__}: {e}"


@dataclass
class Health:
    """Whether the recorder can write, and counters a metric can read (`as_dict()`).

    `failed` is the reason while writes fail, None otherwise; `failures` counts entries into the
    failed state, `refused` the connections and operations refused for want of a record (each
    was waiting on a write that failed or came while failed), `dropped` backlog entries lost to
    its bound (MAX_BACKLOG); `backlog` is what waits to be written."""

    failed: str | None = None
    since: float | None = None
    failures: int = 0
    refused: int = 0
    dropped: int = 0
    backlog: int = 0
    recovered_at: float | None = None

    def as_dict(self) -> dict:
        return {"state": "failed" if self.failed else "ok", **asdict(self)}


def _say(level: int, kind: str, msg: str, data: dict) -> None:
    """The operator's log (stderr/journald), which may itself sit on the full disk: never raises."""
    try:
        _events_log.log(level, "%s: %s", kind, msg, extra={"event": kind, "session": None, "data": data})
    except Exception:  # noqa: BLE001
        pass


# json.dumps(data, sort_keys=True) without building an encoder per call: the same text.
_encode = json.JSONEncoder(sort_keys=True).encode
LINGER = 0.002  # seconds a write nothing waits on may wait for company in its group commit
MAX_BACKLOG = 20000  # entries kept while the database cannot be written (~ a few MB)
RETRY_INTERVAL = 1.0  # seconds between attempts to write the backlog
_Entry = tuple  # (sql, params, durable, future | None)


class CommitHold:
    """Until when (time.monotonic()) the writers of one database hold their commits: the
    Checkpointer sets it while it copies the WAL's last frames. One process keeps it in a float;
    proxy workers sharing a database share one in memory (proxy.workers.SharedHold), since a
    single writer's commit is enough to keep the WAL from starting over."""

    def __init__(self) -> None:
        self.value = 0.0

    def until(self) -> float:
        return self.value

    def set(self, until: float) -> None:
        self.value = until


class GroupWriter:
    """Writes queued during one turn of the event loop, committed together at its end.

    On the loop's own thread: no lock, no thread wake-up, no GIL hand-off per connection; under
    load many connections share one commit. A failed commit puts the recorder in its failed
    state (Recorder.fail); the writer then retries the backlog every RETRY_INTERVAL."""

    def __init__(self, recorder: Recorder, loop: asyncio.AbstractEventLoop, hold: CommitHold):
        self.recorder, self.loop, self.hold = recorder, loop, hold
        self.batch: list[_Entry] = []
        self.scheduled = False
        self.soon = False  # the flush is at the end of this turn (a write waits on it)
        self.lingering: asyncio.TimerHandle | None = None
        self.retrying: asyncio.TimerHandle | None = None
        self.on_commit: Callable[[float, int], None] | None = None  # (seconds, rows): for metrics

    def submit(self, sql: str, params: tuple, durable: bool = False, wait: bool = False,
               linger: bool = False) -> asyncio.Future | None:
        fut = self.loop.create_future() if (wait or durable) else None
        if fut is not None and self.recorder.guard is not None:
            self.recorder.guard()
        if self.recorder.health.failed:
            self.recorder.keep([(sql, params, durable, None)])
            self.recorder.health.refused += fut is not None
            if fut is not None:
                fut.set_exception(RecorderDown(self.recorder.health.failed))
            return fut
        self.batch.append((sql, params, durable, fut))
        if not linger or fut is not None:
            if not self.soon:  # commit at the end of this turn of the loop
                self.soon = self.scheduled = True
                self.loop.call_soon(self.flush)
        elif not self.scheduled:
            # A per-request record nothing waits on (an allowed request's): it rides the next
            # commit, at most LINGER later, so that under load one commit carries the records of
            # many requests instead of one each.
            self.scheduled = True
            self.lingering = self.loop.call_later(LINGER, self.flush)
        return fut

    def flush(self, force: bool = False) -> None:
        if self.lingering is not None:
            self.lingering.cancel()
            self.lingering = None
        held = self.hold.until() - time.monotonic()
        if held > 0 and self.batch and not force:
            # one timer carries everything queued meanwhile, the writes waited on included
            self.scheduled = self.soon = True
            self.lingering = self.loop.call_later(held, self.flush)
            return
        self.scheduled = self.soon = False
        batch, self.batch = self.batch, []
        if not batch:
            return
        started = time.perf_counter()
        error = self.recorder.commit(batch)
        if error is None and self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, len(batch))
        if error is not None:
            self.recorder.health.refused += sum(1 for e in batch if e[3] is not None)
            self.recorder.fail(error, batch)
        for _, _, _, fut in batch:
            if fut is not None and not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(RecorderDown(describe(error)))

    def arm(self) -> None:
        if self.retrying is None:
            self.retrying = self.loop.call_later(RETRY_INTERVAL, self._retry)

    def _retry(self) -> None:
        self.retrying = None
        if not self.recorder.recover():
            self.arm()

    def close(self) -> None:
        self.flush(force=True)
        if self.retrying is not None:
            self.retrying.cancel()
            self.recorder.recover()


CHECKPOINT_INTERVAL = 0.5  # seconds between looks at the proxy's WAL
CHECKPOINT_PAGES = 1000  # SQLite's own wal_autocheckpoint default: checkpoint once the WAL is this long
CHECKPOINT_HOLD = 0.02  # seconds commits may wait at most while the WAL's last frames are copied
WAL_LIMIT = 64 << 20  # bytes: a WAL a burst made longer is cut back to this when it starts over


class Checkpointer:
    """Checkpoints the proxy's WAL from a thread of its own (sqlite3 releases the GIL while it
    works), where SQLite would have done it inside a commit on the event loop: once the WAL file
    holds CHECKPOINT_PAGES pages. PASSIVE: it copies what no reader still needs and never waits
    for, or blocks, the loop's writes. A failed checkpoint is retried at the next look; the WAL
    grows meanwhile, and whether writes succeed is what the recorder's failed state watches.

    SQLite starts a WAL over from its beginning only when a write transaction begins with every
    frame already copied. Under a steady stream of commits (one every LINGER) a checkpoint never
    ends in such a gap, and the WAL grew without bound: 590 MB in ten seconds of the web
    benchmark, every append going into new file blocks that the kernel zeroes first. So after
    the bulk copy the checkpointer asks the writers to hold their commits (CommitHold, at most
    CHECKPOINT_HOLD), copies the last frames, and lets go: the next commit starts the WAL over.
    A commit that comes anyway (the hold ran out) only means another try a look later. One
    checkpointer per database: with several proxy workers, the first one's."""

    def __init__(self, path: Path, interval: float = CHECKPOINT_INTERVAL, hold: CommitHold | None = None):
        self.path, self.interval, self.hold = path, interval, hold
        self.wal = Path(f"{path}-wal")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recorder-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = None
        threshold = None
        try:
            while not self._stop.wait(self.interval):
                try:
                    if conn is None:
                        conn = sqlite3.connect(str(self.path), timeout=0, isolation_level=None)
                        page = conn.execute("PRAGMA page_size").fetchone()[0]
                        threshold = 32 + CHECKPOINT_PAGES * (page + 24)  # WAL header, frames of header + page
                    if self.wal.stat().st_size >= threshold and _checkpoint(conn)[0] >= CHECKPOINT_PAGES:
                        self._start_over(conn)
                except (sqlite3.Error, OSError):
                    pass  # busy, failing or no WAL yet: the next look tries again
        finally:
            if conn is not None:
                conn.close()

    def _start_over(self, conn: sqlite3.Connection) -> None:
        """Copy the frames the bulk checkpoint left behind while no commit comes, so that the next
        commit finds the WAL copied whole and writes from its start."""
        hold = self.hold
        if hold is None:
            return
        hold.set(time.monotonic() + CHECKPOINT_HOLD)
        try:
            _checkpoint(conn)  # a commit already under way when the hold began is in this one
            _checkpoint(conn)
        finally:
            hold.set(0.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _checkpoint(conn: sqlite3.Connection) -> tuple[int, int]:
    """A PASSIVE checkpoint: (frames in the WAL, frames copied into the database)."""
    _, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return frames, copied


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=10, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


assert tuple(f.name for f in fields(SessionRecord)) == tuple(SESSION_COLUMNS), "row() follows SESSION_COLUMNS"
_OPEN_SQL = "INSERT INTO sessions ({}) VALUES ({})".format(",".join(SESSION_COLUMNS), ",".join("?" * len(SESSION_COLUMNS)))
_CLOSE_SQL = ("UPDATE sessions SET ended=?, bytes_up=?, bytes_down=?, outcome=?, detail=?, protocol=?, verdict=?, rule=?"
              " WHERE id=?")
_EVENT_SQL = "INSERT INTO events (at, kind, session, data) VALUES (?,?,?,?)"
_COUNTS_SQL = "UPDATE sessions SET bytes_up=?, bytes_down=? WHERE id=? AND outcome='open'"


class Recorder:
    """The one interface the proxy and the daemon report through.

    With a loop (the proxy) writes go through the group commit and durable ones return a
    future; without (daemon, CLI) they are written before the call returns. Either way a write
    that fails is kept for later (see the module docstring) instead of raising."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop | None = None, who: str = "proxy",
                 on_health: Callable[[Health], None] | None = None, hold: CommitHold | None = None,
                 checkpoint: bool = True):
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(path)
        os.chmod(path, 0o600)
        self.db = sqlite_utils.Database(conn)
        self.conn = conn
        if "sessions" not in self.db.table_names():
            self.db["sessions"].create(SESSION_COLUMNS, pk="id", if_not_exists=True)
            self.db["sessions"].create_index(["agent"], if_not_exists=True)
        elif "identity" not in self.db["sessions"].columns_dict:
            # Recordings made before agents had identities: the column is added, NULL for old rows.
            try:
                conn.execute("ALTER TABLE sessions ADD COLUMN identity TEXT")
            except sqlite3.OperationalError as e:  # the other writer (daemon or proxy) added it first
                if "duplicate column" not in str(e):
                    raise
        if "events" not in self.db.table_names():
            self.db["events"].create(EVENT_COLUMNS, pk="id", if_not_exists=True)
            self.db["events"].create_index(["session"], if_not_exists=True)
        self.who = who  # which process writes: named in recorder-failed/recovered events
        self.health = Health()
        self.on_health = on_health
        self.backlog: list[_Entry] = []
        self.open: dict[str, SessionRecord] = {}  # sessions still open, for the periodic byte flush
        self.live_counts: dict[str, dict] = {}  # bytes moved outside the loop (splice threads), by session
        self._flushed: dict[str, tuple[int, int]] = {}
        self.on_session_close: Callable[[SessionRecord], None] | None = None  # for metrics
        self._lock = threading.RLock()  # daemon: control threads and the watcher share the connection
        # A precondition besides writable storage (the spool bound): while it names a reason, recover() fails.
        self.hold: Callable[[], str | None] | None = None
        # asked before every write an agent waits on (the proxy's spool bound: a sibling worker's finding)
        self.guard: Callable[[], None] | None = None
        self.commit_hold = hold or CommitHold()  # what the checkpointer asks of every writer of this database
        self.writer = GroupWriter(self, loop, self.commit_hold) if loop is not None else None
        self.checkpointer: Checkpointer | None = None
        if loop is not None:
            # The proxy's commits never checkpoint (copy the WAL into the database and fsync it,
            # which stalls every connection while the disk is slow): a thread does, with its own
            # connection, in PASSIVE mode, which never blocks a writer (checkpoint=False: a sibling
            # worker's thread checkpoints this database).
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            if checkpoint:
                self.checkpointer = Checkpointer(path, hold=self.commit_hold)

    # ---- writing, failing, recovering ------------------------------------------------------

    def commit(self, entries: list[_Entry]) -> sqlite3.Error | None:
        """Write entries in one transaction (synchronous=FULL if any is durable); the error, if any."""
        conn = self.conn
        durable = any(e[2] for e in entries)
        # one statement commits by itself (autocommit): no BEGIN to share (executemany would commit each row)
        single = len(entries) == 1 and entries[0][1].__class__ is not list
        try:
            if durable:
                conn.execute("PRAGMA synchronous=FULL")
            if not single:
                conn.execute("BEGIN IMMEDIATE")  # the write lock now, through the busy timeout
            for sql, params, _, fut in entries:
                try:
                    if params.__class__ is list:  # many rows of one statement (Recorder.events)
                        conn.executemany(sql, params)
                    else:
                        conn.execute(sql, params)
                except sqlite3.IntegrityError as e:  # one bad row must not block the others for ever
                    _say(logging.ERROR, "recorder-row-skipped", str(e), {"error": str(e)})
                    if fut is not None and not fut.done():
                        fut.set_exception(RecorderDown(describe(e)))
            if not single:
                conn.execute("COMMIT")
            return None
        except sqlite3.Error as e:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            return e
        finally:
            if durable:
                try:
                    conn.execute("PRAGMA synchronous=NORMAL")
                except sqlite3.Error:
                    pass

    def keep(self, entries: list[_Entry]) -> None:
        """Hold writes for the recovery; past MAX_BACKLOG the oldest go (counted in `dropped`),
        never the recorder-failed event at the head."""
        self.backlog.extend((sql, params, durable, None) for sql, params, durable, _ in entries)
        over = len(self.backlog) - MAX_BACKLOG
        if over > 0:
            del self.backlog[1:over + 1]  # [0] is the recorder-failed event
            self.health.dropped += over
        self.health.backlog = len(self.backlog)

    def fail(self, error: sqlite3.Error | Unrecordable, entries: list[_Entry]) -> None:
        """Enter (or stay in) the failed state: agent traffic is refused until recover()."""
        reason = describe(error)
        first = self.health.failed is None
        if first:
            _say(logging.CRITICAL, "recorder-failed", f"cannot write ({reason}); refusing agent traffic until it can",
                 {"by": self.who, "reason": reason})
            self.health.since = time.time()
            self.health.failures += 1
            self.backlog.insert(0, (_EVENT_SQL, (self.health.since, "recorder-failed", None, json.dumps(
                {"by": self.who, "reason": reason}, sort_keys=True)), True, None))
        self.health.failed = reason
        self.keep(entries)
        if self.writer is not None:
            self.writer.arm()
        if first and self.on_health is not None:
            self.on_health(self.health)

    def recover(self) -> bool:
        """Try to write the backlog and a recorder-recovered event; True when the recorder works."""
        with self._lock:
            h = self.health
            if h.failed is None:
                return True
            held = self.hold() if self.hold is not None else None
            if held is not None:
                h.failed = held
                return False
            now = time.time()
            done = (_EVENT_SQL, (now, "recorder-recovered", None, json.dumps(
                {"by": self.who, "reason": h.failed, "since": h.since, "seconds": round(now - h.since, 3),
                 "refused": h.refused, "written": len(self.backlog), "dropped": h.dropped}, sort_keys=True)), True, None)
            error = self.commit([*self.backlog, done])
            if error is not None:
                h.failed = describe(error)
                return False
            _say(logging.WARNING, "recorder-recovered", f"writing again after {now - h.since:.1f}s "
                 f"({len(self.backlog)} records kept meanwhile, {h.dropped} dropped)", {"by": self.who})
            self.backlog = []
            h.failed, h.since, h.backlog, h.recovered_at = None, None, 0, now
        if self.on_health is not None:
            self.on_health(h)
        return True

    def _write(self, sql: str, params: tuple, durable: bool = False, wait: bool = False,
               linger: bool = False) -> asyncio.Future | None:
        if self.writer is not None:
            return self.writer.submit(sql, params, durable, wait, linger)
        with self._lock:
            entry = (sql, params, durable, None)
            if self.health.failed is not None and not self.recover():
                self.keep([entry])
                return None
            error = self.commit([entry])
            if error is not None:
                self.fail(error, [entry])
        return None

    @property
    def failed(self) -> str | None:
        """Why the recorder cannot write, or None: while set, agent traffic is refused."""
        return self.health.failed

    # ---- what the proxy and the daemon record ------------------------------------------

    def session_open(self, rec: SessionRecord, wait: bool = False) -> asyncio.Future | None:
        """The session row; with wait, a future that resolves once it is committed (act after it)."""
        if rec.outcome == "open":
            self.open[rec.id] = rec
        return self._write(_OPEN_SQL, rec.row(), wait=wait)

    def session_close(self, rec: SessionRecord) -> None:
        if self.on_session_close is not None:
            self.on_session_close(rec)
        self.open.pop(rec.id, None)
        self._flushed.pop(rec.id, None)
        self.live_counts.pop(rec.id, None)
        # Nothing waits on a close: it rides the next commit (a new session's row, at most
        # LINGER later), so a stream of short connections costs one commit each, not two.
        self._write(_CLOSE_SQL, (rec.ended or time.time(), rec.bytes_up, rec.bytes_down, rec.outcome, rec.detail,
                                 rec.protocol, rec.verdict, rec.rule, rec.id), linger=True)

    def flush_counts(self) -> int:
        """Write the byte counts of open sessions that moved since the last flush (one commit for
        all; not fsynced): a proxy that dies leaves counts at most one interval old. Returns how
        many sessions were written."""
        n = 0
        for sid, rec in self.open.items():
            extra = self.live_counts.get(sid)
            counts = (rec.bytes_up + extra["up"], rec.bytes_down + extra["down"]) if extra else \
                (rec.bytes_up, rec.bytes_down)
            if self._flushed.get(sid, (0, 0)) != counts:
                self._flushed[sid] = counts
                self._write(_COUNTS_SQL, (*counts, sid))
                n += 1
        return n

    def close_out(self, outcome: str, detail: str, worker: int | None = None) -> None:
        """Sessions a previous proxy left open (it was killed): closed with their last flushed
        counts; with worker, only those that proxy worker opened (its siblings' live on)."""
        where = "" if worker is None else f" AND substr(id, -8, 2) = '{worker & 0xFF:02x}'"
        self._write("UPDATE sessions SET outcome=?, detail=?, ended=? WHERE outcome='open' AND ended IS NULL" + where,
                    (outcome, detail, time.time()))

    def event(self, kind: str, data: dict, session: str | None = None, durable: bool = False,
              wait: bool = False, linger: bool = False) -> asyncio.Future | None:
        """One event row. linger: a per-request record nothing waits on, which may wait up to
        LINGER for others to share its commit (never a refusal, a hold or anything awaited)."""
        level = LOGGED_EVENTS.get(kind)
        if level is not None:
            _events_log.log(level, kind, extra={"event": kind, "session": session, "data": data})
        return self._write(_EVENT_SQL, (time.time(), kind, session, _encode(data)), durable, wait,
                           linger and not durable)

    def events(self, kind: str, items: list[tuple[dict, str | None]]) -> None:
        """Many events of one kind (not logged, not durable, nothing waits on them), written as
        one executemany in the next group commit: a busy session's statement records."""
        if items:
            now = time.time()
            self._write(_EVENT_SQL, [(now, kind, session, _encode(data)) for data, session in items])

    def decision(self, session: str, op, decision) -> asyncio.Future | None:
        """A decision and its reason. Refusals and holds are flushed to disk (synchronous=FULL)
        before they take effect, so no refusal is ever unrecorded; the future says when."""
        return self.event_json("decision", decision_record(op, decision), session,
                               durable=decision.verdict.value in ("deny", "approve"), wait=True)

    def event_json(self, kind: str, data: str, session: str | None = None, durable: bool = False,
                   wait: bool = False, linger: bool = False) -> asyncio.Future | None:
        """event() for data already encoded (a record a handler encoded once and writes again)."""
        level = LOGGED_EVENTS.get(kind)
        if level is not None:
            _events_log.log(level, kind, extra={"event": kind, "session": session, "data": json.loads(data)})
        return self._write(_EVENT_SQL, (time.time(), kind, session, data), durable, wait, linger and not durable)

    def close(self) -> None:
        self.hold = None  # nothing is admitted any more: what was kept goes to disk (and the spool)
        if self.writer is not None:
            self.writer.close()
        elif self.health.failed:
            self.recover()
        if self.checkpointer is not None:
            self.checkpointer.stop()
        self.conn.close()


def decision_record(op, decision) -> str:
    """A `decision` event's data (policy.model Operation and Decision), as stored."""
    return _encode({"protocol": op.protocol, "action": op.action, "objects": list(op.objects),
                       "risks": list(op.risks), "summary": op.summary, "verdict": decision.verdict.value,
                       "rule": decision.rule, "reason": decision.reason})


def read_sessions(path: Path, agent: str | None = None, limit: int = 1000) -> list[dict]:
    if not path.exists():
        return []
    db = sqlite_utils.Database(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10))
    if "sessions" not in db.table_names():
        return []
    where, args = ("agent = ?", [agent]) if agent else (None, [])
    rows = db["sessions"].rows_where(where, args, order_by="started desc", limit=limit)
    return list(reversed(list(rows)))


def read_events(path: Path, kind: str | None = None, limit: int = 1000) -> list[dict]:
    if not path.exists():
        return []
    db = sqlite_utils.Database(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10))
    if "events" not in db.table_names():
        return []
    where, args = ("kind = ?", [kind]) if kind else (None, [])
    rows = list(db["events"].rows_where(where, args, order_by="id desc", limit=limit))
    for r in rows:
        r["data"] = json.loads(r["data"])
    return list(reversed(rows))


def prune(path: Path, before: float) -> dict[str, int]:
    """Delete what ended before `before` (epoch seconds): closed sessions with their events,
    events of no session, and decided approvals; open sessions and pending holds stay.
    Returns rows deleted per table. The space is given back to the file system (VACUUM)."""
    if not path.exists():
        return {"sessions": 0, "events": 0, "approvals": 0}
    conn = _connect(path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        done = {"sessions": 0, "events": 0, "approvals": 0}
        conn.execute("BEGIN IMMEDIATE")
        if "sessions" in tables:
            old = "SELECT id FROM sessions WHERE ended IS NOT NULL AND ended < ?"
            if "events" in tables:
                done["events"] += conn.execute(f"DELETE FROM events WHERE session IN ({old})", (before,)).rowcount
            done["sessions"] = conn.execute("DELETE FROM sessions WHERE ended IS NOT NULL AND ended < ?", (before,)).rowcount
        if "events" in tables:
            done["events"] += conn.execute("DELETE FROM events WHERE session IS NULL AND at < ?", (before,)).rowcount
        if "approvals" in tables:
            done["approvals"] = conn.execute("DELETE FROM approvals WHERE status != 'pending' AND created < ?",
                                             (before,)).rowcount
        if "journal" in tables:
            from recorder import journal

            done["journal"] = journal.prune(conn, before)  # only what the central recorder acknowledged
        conn.execute("COMMIT")
        conn.execute("VACUUM")
        return done
    finally:
        conn.close()
