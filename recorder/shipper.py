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
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from recorder import journal, records
from recorder.join import HostFiles, JoinError, same_server
from recorder.store import Recorder, Unrecordable

BATCH_RECORDS = 2000
BATCH_BYTES = 4 << 20  # well under the server's 8 MiB
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
                    shipped = await self.ship_once(http)
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

    def batch(self) -> tuple[list[records.Record], list[records.Checkpoint]]:
        """The next records (contiguous from acked + 1) and the unshipped checkpoints they, or the
        records the server holds already, cover (a checkpoint signed after its records were
        shipped goes alone)."""
        acked, cp_shipped = self.conn.execute("SELECT acked_seq, cp_shipped FROM journal_state").fetchone()
        upto = self.durable() if self.durable is not None else 1 << 62
        out, size = [], 0
        for seq, kind, body, h in self.conn.execute(
                "SELECT seq, kind, body, hash FROM journal WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (acked, upto, self.batch_records)):
            size += len(body) + len(kind) + 200
            if out and size > BATCH_BYTES:
                break
            if seq != acked + 1 + len(out):
                break  # never send a gap (cannot happen: seqs are dense)
            out.append(records.Record(self.host, seq, kind, body, h))
        last = out[-1].seq if out else acked
        cps = [records.Checkpoint(self.host, *r) for r in self.conn.execute(
            "SELECT seq, head, at_us, sig FROM journal_checkpoints WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT 500",
            (cp_shipped, last))]
        return out, cps

    async def ship_once(self, http: aiohttp.ClientSession) -> bool:
        """Send one batch; False when there was nothing to send."""
        recs, cps = self.batch()
        if not recs and not cps:
            return False
        body = json.dumps({"host": self.host, "records": [records.to_json(r) for r in recs],
                           "checkpoints": [records.to_json(c) for c in cps]}).encode()
        status, answer = await self._call(http, "POST", "/v1/ingest", body)
        if status == 200:
            try:
                acked = int(answer["acked"])
            except (KeyError, TypeError, ValueError):
                raise ShipError(f"POST /v1/ingest: the answer has no 'acked': {answer}") from None
            sent_to = recs[-1].seq if recs else self.conn.execute("SELECT acked_seq FROM journal_state").fetchone()[0]
            if acked < sent_to:
                raise ShipError(f"the recorder acked seq {acked}, not {sent_to}: asking where its chain ends")
            acked = sent_to
            cp = max([c.seq for c in cps], default=None)
            prev = self.conn.execute("SELECT cp_shipped FROM journal_state").fetchone()[0]
            self._acked(acked, max(prev, cp) if cp is not None else prev)
            self.sent += int(answer.get("stored") or 0)
            self.last_ack_at = time.time()
            self.batch_records = min(BATCH_RECORDS, self.batch_records * 2)
            return True
        if status == 409:
            raise ShipError(f"the recorder expects seq {answer.get('expected', '?')} ({answer.get('error', 'gap')}): "
                            "resending from its head")
        if status == 413:
            self.batch_records = max(1, self.batch_records // 2)
            raise ShipError(f"the recorder found a batch of {len(recs)} records too large: sending fewer", resync=False)
        raise ShipError(f"POST /v1/ingest: HTTP {status}: {answer.get('error', '')}", retry=False)


# ---- the proxy's side: the spool bound -------------------------------------------------------

class SpoolBound:
    """Refuses agent traffic while more than `spool_max` records wait to be shipped.

    `check()` runs every second on the proxy's loop (two index lookups); over the bound it puts
    the recorder in its failed state, and `Recorder.recover` keeps it there (`holding`) until the
    depth falls below the low-water mark. `last` is what metrics read."""

    def __init__(self, recorder: Recorder, server: str, spool_max: int):
        self.recorder, self.server, self.max = recorder, server, spool_max
        self.low = int(spool_max * LOW_WATER)
        self.last: journal.Spool | None = None
        recorder.hold = self.holding
        self.check()  # a proxy started over a full spool refuses from its first connection

    def read(self) -> journal.Spool | None:
        try:
            self.last = journal.spool(self.recorder.conn)
        except sqlite3.Error:
            return self.last  # the recorder's own failure handling covers an unreadable database
        return self.last

    def reason(self, n: int) -> str:
        return f"spool full: {n} records not shipped to {self.server}"

    def check(self) -> None:
        sp = self.read()
        if sp is not None and sp.unshipped > self.max and not self.recorder.failed:
            self.recorder.fail(Unrecordable(self.reason(sp.unshipped)), [])

    def holding(self) -> str | None:
        """Why the recorder must stay failed although it can write (the spool is still full), or None."""
        sp = self.read()
        if sp is not None and sp.unshipped >= self.low and sp.unshipped > 0:
            return self.reason(sp.unshipped)
        return None
