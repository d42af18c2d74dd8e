"""Shipping the journal to the central recorder, and the spool bound the proxy enforces.

`Shipping` is the daemon's part: the chainer (recorder.journal) and a shipper thread running an
aiohttp client over mTLS (the host's certificate; the server verified against the recorder's CA).
The shipper sends chained records in seq order, in batches (≤ BATCH_RECORDS, ≤ BATCH_BYTES),
with the checkpoints they cover; it wakes as soon as the chainer chained something (a held
approval reaches the recorder within about CHAIN_INTERVAL plus one round trip), and a batch is
whatever accumulated meanwhile. The server's ack is stored in the journal (`acked_seq`).

Nothing is lost and nothing is stored twice: ingest is idempotent (a resent record with the same
hash is a duplicate), so after any failure — the recorder or the daemon killed mid-batch, the
network cut, an answer lost — the shipper asks `GET /v1/head` where the host's stored chain ends,
checks that the stored hash there is its own, and resends from the next seq. A 409 gap does the
same. While the recorder is unreachable it backs off (RETRY_MIN doubling to RETRY_MAX).

`SpoolBound` is the proxy's part (fail closed): every second it reads the spool depth (journal
rows not acked); past `spool_max` it puts the recorder in its failed state ("spool full: N records
not shipped to URL"), which refuses agent traffic, and lets it recover only once the shipper has
drained the spool below LOW_WATER × spool_max."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quote  # json.dumps of a str, minus its Python layers
from pathlib import Path

import aiohttp

from recorder import journal, records
from recorder.join import HostFiles, JoinError, same_server
from recorder.store import Recorder, Unrecordable

BATCH_RECORDS = 10_000  # the server's limit per request
BATCH_BYTES = 7 << 20  # request body; the server takes 8 MiB
MAX_CHECKPOINTS = 500  # per request (the server takes 1000)
CHECKPOINT_BYTES = MAX_CHECKPOINTS * 400  # room kept for them within BATCH_BYTES
REQUEST_TIMEOUT = 30.0
RETRY_MIN, RETRY_MAX = 0.25, 5.0  # seconds between attempts while the recorder cannot be reached
IDLE_POLL = 1.0  # seconds the shipper sleeps without a wake-up (checkpoints signed late, missed wakes)
LOW_WATER = 0.9  # the spool bound lifts below this fraction of spool_max


class ShipError(Exception):
    """The recorder refused or could not take a batch; `retry` says whether trying again may help."""

    def __init__(self, message: str, retry: bool = True, resync: bool = True):
        super().__init__(message)
        self.retry, self.resync = retry, resync


def prepare_files(state_dir: Path, server: str) -> HostFiles:
    """The host files for shipping to `server`; JoinError (naming `interlock join`) when this host
    has not joined it."""
    try:
        files = HostFiles.load(state_dir)
    except JoinError as e:
        raise JoinError(f"the config ships records to the recorder at {server}, but {e}. Join it first: interlock join "
                        f"--server {server} --token TOKEN (a token from `interlock recorder token` on the recorder)"
                        ) from None
    if not same_server(files.server, server):
        raise JoinError(f"the config ships records to {server}, but this host joined {files.server} (as host "
                        f"{files.host_id}): fix recorder.server in the config, or join {server}")
    return files


class Shipping:
    """The chainer and the shipper of one daemon (see the module docstring)."""

    def __init__(self, db: Path, files: HostFiles):
        self.db, self.files = db, files
        self.key = records.load_signing_key(files.signing_key)
        self.chainer: journal.Chainer | None = None
        self.shipper: Shipper | None = None
        self.channel = None  # recorder.channel.DecisionChannel once started

    def install(self, conn: sqlite3.Connection) -> None:
        journal.install(conn, self.files.host_id)

    def start(self) -> None:
        self.chainer = journal.Chainer(self.db, self.files.host_id, self.key, on_chained=lambda _: self.shipper.wake())
        self.shipper = Shipper(self.db, self.files, durable=lambda: self.chainer.durable_seq)
        self.chainer.start()
        self.shipper.start()
        from recorder.channel import DecisionChannel  # approvers' answers from the recorder (i-web)
        self.channel = DecisionChannel(self.files, self.db).start()

    def stop(self, drain: float = 2.0) -> None:
        """Chain and sign what is left, give the shipper `drain` seconds to send it, stop both."""
        if self.channel is not None:
            self.channel.stop()
        if self.chainer is not None:
            self.chainer.stop()
        if self.shipper is not None:
            self.shipper.wake()
            self.shipper.stop(drain)

    def status(self) -> dict:
        """Server, host id, acked and head seq, unshipped records, lag seconds, the last error."""
        conn = journal.connect(self.db)
        try:
            sp = journal.spool(conn)
        finally:
            conn.close()
        out = {"server": self.files.server, "host_id": self.files.host_id, **(sp.as_dict() if sp else {})}
        if self.shipper is not None:
            out.update(self.shipper.state())
        if self.chainer is not None and self.chainer.error:
            out["last_error"] = self.chainer.error
        return out


class Shipper:
    """Sends chained journal rows to the recorder; one thread with its own event loop."""

    def __init__(self, db: Path, files: HostFiles, durable: Callable[[], int] | None = None):
        self.db, self.files = db, files
        self.durable = durable  # the highest seq known to be on disk (the chainer's); None: all chained
        self.host, self.server = files.host_id, files.server
        self.conn = journal.connect(db)
        self.batch_records = BATCH_RECORDS
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_ack_at: float | None = None
        self.connected = False
        self.sent = 0  # records the server newly stored, since start
        self.loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # reads the next batch ahead
        self._rconn: sqlite3.Connection | None = None  # that thread's journal connection

    # ---- thread plumbing --------------------------------------------------------------------

    def start(self) -> Shipper:
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            self._wake = asyncio.Event()
            ready.set()
            self._task = self.loop.create_task(self.run())
            try:
                self.loop.run_until_complete(self._task)
            except asyncio.CancelledError:
                pass  # stopped mid-request: the server dedupes whatever it got, the next start resyncs
            finally:
                self.loop.close()

        self._thread = threading.Thread(target=run, name="shipper", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def wake(self) -> None:
        """Ship now (thread-safe): the chainer calls this after each round that moved the head."""
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:
                pass

    def stop(self, drain: float = 0.0) -> None:
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline and self.connected:
            sp = journal.spool(self.conn)
            if sp is None or sp.unshipped == 0:
                break
            time.sleep(0.05)
        self._stopping = True
        if self.loop is not None and self._task is not None:
            try:
                self.loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:
                pass  # the loop is closed already
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._rconn is not None:
            self._rconn.close()
        self.conn.close()

    def state(self) -> dict:
        return {"connected": self.connected, "last_error": self.last_error, "last_error_at": self.last_error_at,
                "last_ack_at": self.last_ack_at, "shipped_since_start": self.sent}

    # ---- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, connect=min(5.0, REQUEST_TIMEOUT))
        connector = aiohttp.TCPConnector(ssl=self.files.client_context(), limit=1)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            delay, resync = 0.0, True
            while not self._stopping:
                try:
                    if resync:
                        await self.resync(http)
                        resync = False
                    shipped = await self.ship(http)
                    delay = 0.0
                    self.connected = True
                    if not shipped:
                        await self._idle(IDLE_POLL)
                except ShipError as e:
                    self._failed(str(e))
                    resync = e.resync
                    if not e.retry:
                        delay = RETRY_MAX
                    elif not e.resync:
                        continue  # e.g. a smaller batch: try again at once
                    else:
                        delay = min(max(delay * 2, RETRY_MIN), RETRY_MAX)
                    await self._idle(delay, wakeable=False)
                except (TimeoutError, aiohttp.ClientError, OSError) as e:
                    self._failed(f"cannot reach the recorder at {self.server}: {e or type(e).__name__}")
                    resync, delay = True, min(max(delay * 2, RETRY_MIN), RETRY_MAX)
                    await self._idle(delay, wakeable=False)
                except sqlite3.Error as e:
                    self._failed(f"cannot read the journal: {e}")
                    delay = min(max(delay * 2, RETRY_MIN), RETRY_MAX)
                    await self._idle(delay, wakeable=False)

    def _failed(self, why: str) -> None:
        self.connected = False
        self.last_error, self.last_error_at = why, time.time()

    async def _idle(self, seconds: float, wakeable: bool = True) -> None:
        """Sleep until woken (new rows) or `seconds` pass; a back-off is not cut short by new rows."""
        if self._stopping:
            return
        if not wakeable:
            end = time.monotonic() + seconds
            while not self._stopping and time.monotonic() < end:
                await asyncio.sleep(min(0.1, end - time.monotonic()))
            return
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass
        self._wake.clear()

    async def _call(self, http: aiohttp.ClientSession, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"} if body is not None else None
        async with http.request(method, f"{self.server}{path}", data=body, headers=headers) as resp:
            text = await resp.text()
            try:
                answer = json.loads(text) if text else {}
            except ValueError:
                answer = {"error": text[:200]}
            if not isinstance(answer, dict):
                answer = {"error": str(answer)[:200]}
            if resp.status in (401, 403):
                raise ShipError(f"the recorder refused this host (HTTP {resp.status}: {answer.get('error', '')}); "
                                "was it revoked? join again with a new token", retry=False)
            if resp.status >= 500:
                raise ShipError(f"the recorder failed (HTTP {resp.status}: {answer.get('error', '')})")
            return resp.status, answer

    # ---- resuming -----------------------------------------------------------------------

    async def resync(self, http: aiohttp.ClientSession) -> None:
        """Start again where the server's stored chain ends (after a crash, a cut, a 409)."""
        status, answer = await self._call(http, "GET", "/v1/head")
        if status != 200:
            raise ShipError(f"GET /v1/head: HTTP {status}: {answer.get('error', '')}")
        try:
            seq, head = int(answer.get("seq") or 0), str(answer.get("hash") or "")
        except (TypeError, ValueError):
            raise ShipError(f"GET /v1/head: not {{seq, hash}}: {answer}") from None
        st = self.conn.execute("SELECT head_seq, acked_seq, cp_shipped FROM journal_state").fetchone()
        if seq > st[0]:
            raise ShipError(f"the recorder holds this host's chain up to seq {seq}, past this host's own head "
                            f"{st[0]}: the records do not come from this journal (see interlock verify)", retry=False)
        if seq > 0:
            mine = self.conn.execute("SELECT hash FROM journal WHERE seq = ?", (seq,)).fetchone()
            if mine is not None and mine[0] != head:
                raise ShipError(f"the recorder's record seq {seq} differs from this host's (a fork): not shipping "
                                "(see interlock verify)", retry=False)
            if mine is None and seq < st[1]:
                raise ShipError(f"the recorder lost records after seq {seq} that were pruned here already")
        if seq < st[1]:
            first = self.conn.execute("SELECT min(seq) FROM journal WHERE seq IS NOT NULL").fetchone()[0]
            if first is not None and first > seq + 1:
                raise ShipError(f"the recorder holds up to seq {seq} but seqs {seq + 1}..{first - 1} were pruned here "
                                "after it acknowledged them: they cannot be sent again", retry=False)
        self._acked(seq, min(st[2], seq) if seq < st[1] else st[2])

    def _acked(self, seq: int, cp_shipped: int) -> None:
        row = self.conn.execute("SELECT id FROM journal WHERE seq = ?", (seq,)).fetchone()
        with_id = row[0] if row else None
        if with_id is None and seq > 0:  # pruned: the ack cannot move backwards past what is gone
            with_id = self.conn.execute("SELECT acked_id FROM journal_state").fetchone()[0]
        self.conn.execute("UPDATE journal_state SET acked_seq = ?, acked_id = ?, acked_at = ?, cp_shipped = ?",
                          (seq, with_id or 0, time.time(), cp_shipped))

    # ---- one batch ----------------------------------------------------------------------

    def batch(self, acked: int | None = None, cp_shipped: int | None = None,
              conn: sqlite3.Connection | None = None) -> Prepared | None:
        """The next batch after `acked` (default: the stored ack): records contiguous from acked + 1
        (≤ batch_records, ≤ BATCH_BYTES of request body) and the unshipped checkpoints (after
        `cp_shipped`) they, or the records the server holds already, cover (a checkpoint signed
        after its records were shipped goes alone); None when there is nothing to send.

        The request body is built as bytes straight from the journal's text: a body is JSON text
        shipped verbatim, so it is only escaped into a JSON string (json's own C escaper, ASCII out), never
        parsed or re-encoded; no Record objects or dicts per record."""
        conn = conn or self.conn
        if acked is None or cp_shipped is None:
            acked, cp_shipped = conn.execute("SELECT acked_seq, cp_shipped FROM journal_state").fetchone()
        upto = self.durable() if self.durable is not None else 1 << 62
        host = json.dumps(self.host)
        head = f'{{"host":{host},"records":['.encode()
        parts: list[str] = []
        size, want, quote = len(head) + 64, acked + 1, _quote
        for seq, kind, body, h in conn.execute(
                "SELECT seq, kind, body, hash FROM journal WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (acked, upto, self.batch_records)):
            if seq != want:
                break  # never send a gap (cannot happen: seqs are dense)
            part = f'{{"type":"record","host":{host},"seq":{seq},"kind":{quote(kind)},"body":{quote(body)},"hash":{quote(h)}}}'
            size += len(part) + 1  # ASCII: json.dumps escapes everything else
            if parts and size > BATCH_BYTES - CHECKPOINT_BYTES:
                break
            parts.append(part)
            want += 1
        last = want - 1
        cps = conn.execute("SELECT seq, head, at_us, sig FROM journal_checkpoints WHERE seq > ? AND seq <= ? ORDER BY seq"
                           " LIMIT ?", (cp_shipped, last, MAX_CHECKPOINTS)).fetchall()
        if not parts and not cps:
            return None
        cp_text = ",".join(json.dumps(records.to_json(records.Checkpoint(self.host, *r))) for r in cps)
        body = b"".join((head, ",".join(parts).encode(), b'],"checkpoints":[', cp_text.encode(), b"]}"))
        return Prepared(body, acked, last, len(parts), max((r[0] for r in cps), default=None))

    async def ship_once(self, http: aiohttp.ClientSession) -> bool:
        """Send one batch; False when there was nothing to send."""
        return await self.ship(http, 1) > 0

    async def ship(self, http: aiohttp.ClientSession, rounds: int = 1 << 62) -> int:
        """Send batches in seq order until nothing is left (or `rounds` were sent); returns how many.

        One request is on the wire at a time (the server stores one host's batches in order under a
        row lock; two in flight could reach it out of order and read as a gap), but while batch n is
        on the wire and being stored, batch n + 1 is read from the journal and encoded on a worker
        thread, from the ack batch n will give. Any failure drops the read-ahead: the caller resyncs
        from /v1/head, or retries from the stored ack."""
        loop = asyncio.get_running_loop()
        acked, cp_shipped = self.conn.execute("SELECT acked_seq, cp_shipped FROM journal_state").fetchone()
        cur = self.batch(acked, cp_shipped)
        sent = 0
        while cur is not None and sent < rounds and not self._stopping:
            ahead = loop.run_in_executor(self._reader(), self._read_ahead, cur.last, max(cp_shipped, cur.cp or 0)) \
                if sent + 1 < rounds else None
            try:
                status, answer = await self._call(http, "POST", "/v1/ingest", cur.body)
                self._answered(cur, status, answer)
            except BaseException:
                if ahead is not None:
                    ahead.cancel()
                    with contextlib.suppress(BaseException):
                        await ahead
                raise
            sent += 1
            cp_shipped = max(cp_shipped, cur.cp or 0)
            if ahead is not None:
                cur = await ahead
            elif sent < rounds:
                cur = self.batch(cur.last, cp_shipped)
        return sent

    def _reader(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shipper-read")
        return self._pool

    def _read_ahead(self, acked: int, cp_shipped: int) -> Prepared | None:
        if self._rconn is None:  # the worker thread's own connection (one reader per thread)
            self._rconn = journal.connect(self.db)
        return self.batch(acked, cp_shipped, self._rconn)

    def _answered(self, cur: Prepared, status: int, answer: dict) -> None:
        if status == 200:
            try:
                acked = int(answer["acked"])
            except (KeyError, TypeError, ValueError):
                raise ShipError(f"POST /v1/ingest: the answer has no 'acked': {answer}") from None
            if acked < cur.last:
                raise ShipError(f"the recorder acked seq {acked}, not {cur.last}: asking where its chain ends")
            prev = self.conn.execute("SELECT cp_shipped FROM journal_state").fetchone()[0]
            self._acked(cur.last, max(prev, cur.cp) if cur.cp is not None else prev)
            self.sent += int(answer.get("stored") or 0)
            self.last_ack_at = time.time()
            self.batch_records = min(BATCH_RECORDS, self.batch_records * 2)
            return
        if status == 409:
            raise ShipError(f"the recorder expects seq {answer.get('expected', '?')} ({answer.get('error', 'gap')}): "
                            "resending from its head")
        if status == 413:
            self.batch_records = max(1, self.batch_records // 2)
            raise ShipError(f"the recorder found a batch of {cur.n} records too large: sending fewer", resync=False)
        raise ShipError(f"POST /v1/ingest: HTTP {status}: {answer.get('error', '')}", retry=False)


@dataclass(frozen=True)
class Prepared:
    """One encoded request: records after seq `after` up to `last` (`n` of them; last == after when
    only checkpoints go), and the highest checkpoint seq it carries (None: none)."""

    body: bytes
    after: int
    last: int
    n: int
    cp: int | None


# ---- the proxy's side: the spool bound -------------------------------------------------------

class SpoolBound:
    """Refuses agent traffic while more than `spool_max` records wait to be shipped.

    `check()` runs every second on the proxy's loop (two index lookups); over the bound it puts
    the recorder in its failed state, and `Recorder.recover` keeps it there (`holding`) until the
    depth falls below the low-water mark. `last` is what metrics read.

    Proxy workers share one spool, and the host's status says "full" as soon as one of them
    does, so the state is shared too (`tripped`, a CLOCK_MONOTONIC cell in shared memory,
    proxy.workers.SharedStamp): non-zero while some worker holds the spool full, stamped after
    the read that found it so. `look()`, before an admission or a write an agent waits on, asks
    whether a sibling tripped since this worker's last read and then reads for itself; while the
    cell is set a sibling holds to the same low-water mark, and one that cannot read the spool
    then refuses (fail closed)."""

    def __init__(self, recorder: Recorder, server: str, spool_max: int, tripped=None):
        self.recorder, self.server, self.max = recorder, server, spool_max
        self.low = int(spool_max * LOW_WATER)
        self.last: journal.Spool | None = None
        self.tripped = tripped  # with get() and set(monotonic seconds); None: a lone proxy
        self.read_at = 0.0  # CLOCK_MONOTONIC at the start of the last read that succeeded
        recorder.hold = self.holding
        if tripped is not None:
            recorder.guard = self.look
        self.check()  # a proxy started over a full spool refuses from its first connection

    def read(self) -> journal.Spool | None:
        """The spool's depth; None when there is no journal or it cannot be read (then read_at
        stays: a sibling's stamp is asked about again)."""
        at = time.monotonic()
        try:
            sp = journal.spool(self.recorder.conn)
        except sqlite3.Error:
            return None
        if sp is not None:
            self.last, self.read_at = sp, at
        return sp

    def reason(self, n: int) -> str:
        return f"spool full: {n} records not shipped to {self.server}"

    def _held(self) -> bool:
        return self.tripped is not None and self.tripped.get() > 0

    def check(self) -> None:
        if self.recorder.health.failed:
            return
        sp = self.read()
        if sp is None:
            if self.behind():
                self._fail("spool full (a sibling worker found it so; this worker cannot read it to see for itself)")
            return
        if sp.unshipped > self.max or (self._held() and sp.unshipped >= self.low and sp.unshipped > 0):
            self._fail(self.reason(sp.unshipped))

    def _fail(self, reason: str) -> None:
        if self.tripped is not None:
            # after the read, so a sibling's read that began earlier is behind it; not this one's
            self.read_at = at = time.monotonic()
            self.tripped.set(at)
        self.recorder.fail(Unrecordable(reason), [])

    def behind(self) -> bool:
        """Whether a sibling found the spool full after this worker last read it (one shared
        memory read: the cost of asking on every connection)."""
        return self.tripped is not None and self.tripped.get() > self.read_at

    def look(self) -> None:
        """Before an admission: read the spool if a sibling found it full since the last read."""
        if self.behind():
            self.check()

    def holding(self) -> str | None:
        """Why the recorder must stay failed although it can write (the spool is still full), or None."""
        fresh = self.read()
        sp = fresh or self.last  # unreadable now: judge by the last depth read
        if sp is not None and sp.unshipped >= self.low and sp.unshipped > 0:
            return self.reason(sp.unshipped)
        if fresh is not None and self.tripped is not None and 0 < self.tripped.get() <= self.read_at:
            self.tripped.set(0.0)  # drained below the low-water mark: nobody holds it any more
        return None
