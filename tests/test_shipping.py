"""The host side of the central recorder without a network: the journal triggers (what each write
appends, what it does not), the chainer (dense seqs, H(seq), signed checkpoints; a process killed
-9 mid-round neither forks nor skips), the spool bound (fail closed, recover below the low-water
mark), prune keeping unshipped rows, and the `recorder:` config and `interlock join` refusals.

Shipping to a real recorder is in tests/test_shipping_central.py; two agent hosts with daemons,
faults and an unprivileged agent in tests/test_shipping_e2e.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from interceptor.config import ConfigError, load
from recorder import approvals, journal, records, store
from recorder.shipper import SpoolBound
from recorder.store import Recorder, RecorderDown, SessionRecord, new_session_id

HOST = "h-test"
ROOT = Path(__file__).resolve().parents[1]


def session(**kw) -> SessionRecord:
    base = dict(id=new_session_id(), agent="bot", pid=10, tgid=10, uid=65533, gid=65533, comm="python3",
                exe="/usr/bin/python3", cmdline="python3 x.py", cgroup_id=1, dst_addr="10.0.0.2",
                dst_port=7000, family="ipv4")
    return SessionRecord(**{**base, **kw})


def journal_rows(conn: sqlite3.Connection) -> list[tuple[str, dict]]:
    return [(k, json.loads(b)) for k, b in conn.execute("SELECT kind, body FROM journal ORDER BY id")]


def chain_of(conn: sqlite3.Connection) -> tuple[list[records.Record], list[records.Checkpoint]]:
    recs = [records.Record(HOST, *r) for r in conn.execute(
        "SELECT seq, kind, body, hash FROM journal WHERE seq IS NOT NULL ORDER BY seq")]
    cps = [records.Checkpoint(HOST, *r) for r in conn.execute("SELECT seq, head, at_us, sig FROM journal_checkpoints")]
    return recs, cps


@pytest.fixture
def rec(tmp_path):
    r = Recorder(tmp_path / "recorder.db", who="daemon")
    journal.install(r.conn, HOST)
    yield r
    r.close()


def test_triggers_journal_sessions_events_and_approvals_but_not_byte_flushes(rec, tmp_path):
    s = session(started=1764514010.123456)
    rec.session_open(s)
    s.bytes_up = 10
    rec.flush_counts()  # a byte-count flush: outcome stays open, nothing journaled
    rec.event("decision", {"verdict": "deny", "rule": "r1"}, s.id)
    rec.conn.execute("INSERT INTO events (at, kind, session, data) VALUES (1.5, 'odd', NULL, 'not json {')")
    s.outcome, s.ended = "closed", 1764514011.5
    rec.session_close(s)
    rec.session_close(s)  # closed again: not journaled twice
    left = session()
    rec.session_open(left)
    rec.close_out("proxy-died", "killed")  # the bulk update closes `left`
    aid = approvals.request(rec.conn, approvals.HeldOperation(s.id, "bot", "db:5432", "postgres", "delete",
                                                                ("t",), "DELETE FROM t", "r2", "why", 60))
    approvals.decide(tmp_path / "recorder.db", aid, approve=False, by="alice", note="no")
    assert rec.conn.execute("SELECT count(*) FROM journal_sessions").fetchone()[0] == 4  # rendered by the chainer
    ch = journal.Chainer(tmp_path / "recorder.db", HOST, Ed25519PrivateKey.generate())
    assert ch.run_once() == 8
    ch.conn.close()
    assert rec.conn.execute("SELECT count(*) FROM journal_sessions").fetchone()[0] == 0
    kinds = [k for k, _ in journal_rows(rec.conn)]
    assert kinds == ["session-open", "event", "event", "session-close", "session-open", "session-close",
                     "approval", "approval"]
    rows = journal_rows(rec.conn)
    opened, decision, odd, closed = (b for _, b in rows[:4])
    assert opened["started"] == 1764514010.123456 and opened["bytes_up"] == 0 and opened["outcome"] == "open"
    assert set(opened) == set(store.SESSION_COLUMNS)
    assert decision == {"id": 1, "at": decision["at"], "kind": "decision", "session": s.id,
                        "data": {"rule": "r1", "verdict": "deny"}}
    assert odd["data"] == "not json {"  # kept as a string, and the insert was not refused
    stored = dict(zip(store.SESSION_COLUMNS, rec.conn.execute(f"SELECT {','.join(store.SESSION_COLUMNS)} FROM sessions "
                                                               "WHERE id = ?", (s.id,)).fetchone(), strict=True))
    assert closed == stored  # every column, floats exact
    assert rows[5][1]["id"] == left.id and rows[5][1]["outcome"] == "proxy-died"
    assert rows[6][1]["status"] == "pending" and rows[7][1]["status"] == "denied" and rows[7][1]["decided_by"] == "alice"


def test_the_chain_is_dense_verifies_and_checkpoints_at_most_every_interval(rec, tmp_path):
    key = Ed25519PrivateKey.generate()
    ch = journal.Chainer(tmp_path / "recorder.db", HOST, key)
    t = 1000.0
    for i in range(5):
        for j in range(7):
            rec.event("x", {"i": i, "j": j})
        assert ch.run_once(now=t + i * 0.3) == 7
    recs, cps = chain_of(rec.conn)
    assert [r.seq for r in recs] == list(range(1, 36))
    # rounds at 0.0, 0.3, 0.6, 0.9, 1.2 s: signed at the first and the fifth (≥ CHECKPOINT_INTERVAL apart)
    assert [c.seq for c in cps] == [7, 35]
    assert records.verify_chain(HOST, recs, cps, key.public_key()) == []
    assert ch.run_once(now=t + 1.4) == 0  # nothing new, head signed: nothing to do
    rec.event("late", {})
    assert ch.run_once(now=t + 1.5) == 1  # 0.3 s after the last signature: not signed yet
    recs, cps = chain_of(rec.conn)
    assert [f.problem for f in records.verify_chain(HOST, recs, cps, key.public_key())] == ["unsigned"]
    assert ch.run_once(now=t + 2.3) == 0  # no new row, but the head moved unsigned long enough: signed now
    recs, cps = chain_of(rec.conn)
    assert records.verify_chain(HOST, recs, cps, key.public_key()) == []
    # an edited journal row is named by the chain (what the server's verify does with the copy it holds)
    rec.conn.execute("UPDATE journal SET body = replace(body, 'late', 'LATE') WHERE seq = 36")
    recs, cps = chain_of(rec.conn)
    assert records.verify_chain(HOST, recs, cps, key.public_key())[0].seq == 36
    ch.conn.close()


_CHAIN_FOREVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from recorder import journal, records
    journal.CHAIN_BATCH = int(sys.argv[3])
    ch = journal.Chainer(Path(sys.argv[1]), sys.argv[2], records.load_signing_key(Path(sys.argv[4])))
    print("ready", flush=True)
    rounds = 0
    while True:  # a fake clock 10 s per round: every round also signs a checkpoint
        rounds += 1
        ch.run_once(now=10.0 * rounds)
""")


def test_a_chainer_killed_mid_round_neither_forks_nor_skips(rec, tmp_path):
    """kill -9 of a chaining process at many points: every journal row ends up chained exactly once,
    seqs dense, the chain and its checkpoints verify."""
    key_file = tmp_path / "signing.key"
    key = records.new_signing_key(key_file)
    db = tmp_path / "recorder.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    total, kills = 0, 0
    for delay in (0.05, 0.12, 0.2, 0.3, 0.45, 0.6):
        rec.conn.execute("BEGIN")
        for i in range(3000):
            rec.conn.execute("INSERT INTO events (at, kind, session, data) VALUES (?, 'bulk', NULL, ?)",
                             (time.time(), json.dumps({"n": total + i})))
            if i % 10 == 0:  # session rows too: their bodies are rendered inside the chaining transaction
                rec.conn.execute(store._OPEN_SQL, session(id=f"s{total + i}").row())
        rec.conn.execute("COMMIT")
        total += 3000
        p = subprocess.Popen([sys.executable, "-c", _CHAIN_FOREVER, str(db), HOST, "700", str(key_file)], env=env,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        kills += 1
    ch = journal.Chainer(db, HOST, key)
    while ch.run_once(now=time.time() + 1e6):
        pass
    ch.run_once(now=time.time() + 2e6)  # the head signed
    ch.conn.close()
    recs, cps = chain_of(rec.conn)
    opened = total // 10
    assert [r.seq for r in recs] == list(range(1, total + opened + 1))
    assert rec.conn.execute("SELECT count(*) FROM journal WHERE seq IS NULL OR body IS NULL").fetchone()[0] == 0
    assert rec.conn.execute("SELECT count(*) FROM journal_sessions").fetchone()[0] == 0
    assert sorted(json.loads(r.body)["data"]["n"] for r in recs if r.kind == "event") == list(range(total))
    assert sorted(json.loads(r.body)["id"] for r in recs if r.kind == "session-open") == \
        sorted(f"s{n}" for n in range(0, total, 10))
    assert len(cps) >= 2
    assert records.verify_chain(HOST, recs, cps, key.public_key()) == []
    assert kills == 6


def test_install_refuses_another_host_id_once_chained_and_uninstall_stops_journaling(rec, tmp_path):
    key = Ed25519PrivateKey.generate()
    rec.event("x", {})
    ch = journal.Chainer(tmp_path / "recorder.db", HOST, key)
    ch.run_once()
    ch.conn.close()
    with pytest.raises(journal.JournalError, match="one host id per journal"):
        journal.install(rec.conn, "h-other")
    journal.uninstall(rec.conn)
    before = rec.conn.execute("SELECT count(*) FROM journal").fetchone()[0]
    rec.event("y", {})
    assert rec.conn.execute("SELECT count(*) FROM journal").fetchone()[0] == before
    journal.install(rec.conn, HOST)  # again: idempotent, journaling resumes
    rec.event("z", {})
    assert rec.conn.execute("SELECT count(*) FROM journal").fetchone()[0] == before + 1


def _ack(conn: sqlite3.Connection, seq: int) -> None:
    """What the shipper stores after the server acknowledged up to `seq`."""
    row = conn.execute("SELECT id FROM journal WHERE seq = ?", (seq,)).fetchone()
    conn.execute("UPDATE journal_state SET acked_seq = ?, acked_id = ?, acked_at = ?", (seq, row[0], time.time()))


def test_a_full_spool_refuses_agent_traffic_until_drained_below_the_low_water_mark(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "RETRY_INTERVAL", 0.05)
    loop = asyncio.new_event_loop()
    try:
        r = Recorder(tmp_path / "recorder.db", loop)
        journal.install(r.conn, HOST)
        changes = []
        r.on_health = lambda h: changes.append(h.failed)
        bound = SpoolBound(r, "https://rec.test:8443", spool_max=10)
        key = Ed25519PrivateKey.generate()
        ch = journal.Chainer(tmp_path / "recorder.db", HOST, key)
        for i in range(10):
            loop.run_until_complete(r.event("x", {"i": i}, wait=True))
        bound.check()
        assert not r.failed  # 10 is not over 10
        ok = session()
        loop.run_until_complete(r.session_open(ok, wait=True))  # control: admitted and on record
        bound.check()
        assert r.failed == "spool full: 11 records not shipped to https://rec.test:8443"
        assert bound.last.unshipped == 11 and bound.last.lag >= 0
        refused = session(outcome="recorder-error")
        with pytest.raises(RecorderDown, match="spool full"):
            loop.run_until_complete(r.session_open(refused, wait=True))
        ch.run_once()
        _ack(r.conn, 2)  # 9 left: still at or above the low-water mark (9)
        loop.run_until_complete(asyncio.sleep(0.3))
        assert r.failed == "spool full: 9 records not shipped to https://rec.test:8443"
        _ack(r.conn, 5)  # 6 left: recovers on the next retry, and writes what it kept
        loop.run_until_complete(asyncio.sleep(0.3))
        assert r.failed is None and changes[0].startswith("spool full") and changes[-1] is None
        ids = {row[0] for row in r.conn.execute("SELECT id FROM sessions")}
        assert refused.id in ids  # the refused attempt is on record (and in the journal, to be shipped)
        kinds = [row[0] for row in r.conn.execute("SELECT kind FROM events ORDER BY id")]
        assert kinds[-2:] == ["recorder-failed", "recorder-recovered"]
        ch.conn.close()
        r.close()
    finally:
        loop.close()


def test_a_sibling_worker_reads_the_spool_before_its_next_admission_once_one_found_it_full(tmp_path, monkeypatch):
    """Workers share one spool but read its depth each on its own second. The one that finds it
    full stamps the shared cell after its read, so a sibling's next connection reads it too
    (server.py and every waited write call look()) instead of admitting for up to a second after
    status said full; while the cell is set siblings hold to the same low-water mark, and one
    that cannot read the spool refuses. Control: a worker without the cell is told nothing."""
    from proxy.workers import SharedStamp

    cell = tmp_path / "spool-tripped"
    cell.write_bytes(bytes(8))
    loop = asyncio.new_event_loop()
    db = tmp_path / "recorder.db"
    first = Recorder(db, loop)
    journal.install(first.conn, HOST)
    sibling, alone = Recorder(db, loop, checkpoint=False), Recorder(db, loop, checkpoint=False)
    opened = [first, sibling, alone]
    url = "https://rec.test:8443"

    def worker(shared: bool) -> tuple[Recorder, SpoolBound]:
        r = Recorder(db, loop, checkpoint=False)
        opened.append(r)
        return r, SpoolBound(r, url, 10, SharedStamp(cell) if shared else None)

    try:
        bounds = [SpoolBound(r, url, 10, SharedStamp(cell) if r is not alone else None)
                  for r in (first, sibling, alone)]
        for i in range(11):
            loop.run_until_complete(first.event("x", {"i": i}, wait=True))
        assert not any(b.behind() for b in bounds)  # nobody has found it full yet
        bounds[0].check()
        assert first.failed and not sibling.failed and not alone.failed
        assert [b.behind() for b in bounds] == [False, True, False]
        with pytest.raises(RecorderDown, match="spool full: 11"):  # a write it waits on asks first
            loop.run_until_complete(sibling.event("agent", {}, wait=True))
        assert sibling.failed == first.failed == "spool full: 11 records not shipped to https://rec.test:8443"
        assert not bounds[1].behind()  # it has looked: the next connection asks nothing more
        loop.run_until_complete(alone.event("control", {}, wait=True))  # the control is admitted
        # Drained to 9, the low-water mark: the holder stays failed, and so does a worker that
        # starts now (the cell is set); the control, which holds nothing, admits.
        ch = journal.Chainer(db, HOST, Ed25519PrivateKey.generate())
        ch.run_once()
        _ack(first.conn, 3)  # 12 recorded (the control's too): 9 left
        late, _ = worker(shared=True)
        assert late.failed == "spool full: 9 records not shipped to https://rec.test:8443"
        fresh, _ = worker(shared=False)
        assert not fresh.failed
        # A sibling that cannot read the spool after a (new) trip refuses; the control does not.
        _ack(first.conn, 7)  # 5 left: below the mark, nobody starting now holds
        assert first.recover() and SharedStamp(cell).get() == 0  # the holder lets go and clears the cell
        blind, blind_bound = worker(shared=True)
        control, control_bound = worker(shared=False)
        SharedStamp(cell).set(store.time.monotonic())
        with monkeypatch.context() as m:
            m.setattr(journal, "spool", lambda conn: (_ for _ in ()).throw(sqlite3.OperationalError("disk I/O error")))
            blind_bound.look()
            control_bound.look()
        assert blind.failed and "cannot read it" in blind.failed and not control.failed
        ch.conn.close()
    finally:
        for r in opened:
            r.close()
        loop.close()


def test_prune_never_deletes_unshipped_journal_rows(rec, tmp_path):
    key = Ed25519PrivateKey.generate()
    ch = journal.Chainer(tmp_path / "recorder.db", HOST, key)
    for i in range(6):
        rec.event("x", {"i": i})
    ch.run_once(now=time.time())
    _ack(rec.conn, 4)
    rec.event("unchained", {"pruned": "before it was chained"})
    done = store.prune(tmp_path / "recorder.db", time.time() + 3600)
    assert done["journal"] == 4 and done["events"] == 7  # the unchained event's row is gone from events...
    left = [r[0] for r in rec.conn.execute("SELECT seq FROM journal ORDER BY id")]
    assert left == [5, 6, None]
    sp = journal.spool(rec.conn)
    assert (sp.unshipped, sp.acked_seq, sp.head_seq) == (3, 4, 6)
    assert ch.run_once() == 1  # ...but its journal row was rendered as it went, and is chained and shippable
    body = json.loads(rec.conn.execute("SELECT body FROM journal WHERE seq = 7").fetchone()[0])
    assert body["kind"] == "unchained" and body["data"] == {"pruned": "before it was chained"}
    ch.conn.close()


def test_recorder_config(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("recorder:\n  server: https://rec.example:8443/\n  spool_max: 50\n")
    cfg = load(f)
    assert (cfg.recorder.server, cfg.recorder.spool_max) == ("https://rec.example:8443", 50)
    f.write_text("recorder:\n  server: https://rec.example:8443\n")
    assert load(f).recorder.spool_max == 1_000_000
    assert load(None).recorder is None
    for bad, msg in (("recorder: https://x", "mapping with 'server"), ("recorder:\n  server: http://x\n", "https://"),
                     ("recorder:\n  server: https://x\n  spool_max: 0\n", "spool_max"),
                     ("recorder:\n  server: https://x\n  spool: 5\n", "unknown key")):
        f.write_text(bad)
        with pytest.raises(ConfigError, match=msg):
            load(f)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "interceptor.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)


def test_join_refuses_a_malformed_token_and_an_http_url(tmp_path):
    r = _cli("join", "--state-dir", str(tmp_path), "--server", "https://127.0.0.1:1", "--token", "il1.x.y")
    assert r.returncode == 2 and "not an Interlock enrolment token" in r.stderr
    r = _cli("join", "--state-dir", str(tmp_path), "--server", "http://127.0.0.1:1", "--token", "il1.a.b." + "0" * 64)
    assert r.returncode == 2 and "must be an https:// URL" in r.stderr
    r = _cli("join", "--state-dir", str(tmp_path), "--server", "https://127.0.0.1:1", "--token", "il1.a.b." + "0" * 64)
    assert r.returncode == 2 and "cannot reach the recorder at https://127.0.0.1:1" in r.stderr
    assert not (tmp_path / "recorder").exists() and not list(tmp_path.glob(".recorder-joining-*"))
    r = _cli("join", "--state-dir", str(tmp_path), "--server", "https://127.0.0.1:1", "--token", "il1.a.b." + "0" * 64,
             preexec_fn=lambda: os.setresuid(65533, 65533, 65533))
    assert r.returncode == 2 and "must run as root" in r.stderr


def test_a_daemon_configured_to_ship_refuses_to_start_before_the_host_joined(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"instance: tjoin{os.getpid() % 10000}\ncgroup_root: interlock-lab-tjoin{os.getpid()}\n"
                   "recorder:\n  server: https://rec.example:8443\n")
    r = _cli("daemon", "--state-dir", str(tmp_path), "--config", str(cfg))
    assert r.returncode == 2
    assert "has not joined a recorder" in r.stderr and "interlock join --server https://rec.example:8443" in r.stderr
    assert not (tmp_path / "recorder.db").exists()  # refused before anything was installed or written


def test_a_batch_is_the_journal_verbatim_within_the_limits(rec, tmp_path, monkeypatch):
    """The shipper builds the request body from the journal's text without re-encoding a body: parsed
    back, every record is the stored one, byte for byte (quotes, backslashes, control characters,
    non-ASCII, astral characters), contiguous from the ack, within the record and byte limits, with
    the checkpoints it covers; a batch read ahead from a given ack starts right after it."""
    from types import SimpleNamespace

    from recorder import shipper

    key = Ed25519PrivateKey.generate()
    ch = journal.Chainer(tmp_path / "recorder.db", HOST, key)
    tricky = ['say "hi"\\n', "tab\there\nnl\r\x01\x1f", "é ü 中文 \U0001f600", "</script>\u2028\u2029", "x" * 3000]
    for i in range(40):
        rec.event("x", {"i": i, "text": tricky[i % len(tricky)]})
    ch.run_once(now=time.time() + 3600)
    recs, cps = chain_of(rec.conn)
    assert len(recs) == 40 and cps
    s = shipper.Shipper(tmp_path / "recorder.db", SimpleNamespace(host_id=HOST, server="https://recorder.invalid"))
    try:
        def parsed(p):
            doc = json.loads(p.body)
            got = [records.from_json(x) for x in doc["records"]]
            return doc, got

        p = s.batch()
        doc, got = parsed(p)
        assert doc["host"] == HOST and got == recs and (p.after, p.last, p.n) == (0, 40, 40)
        assert [records.from_json(c) for c in doc["checkpoints"]] == cps and p.cp == cps[-1].seq
        assert p.body.isascii()
        s.batch_records = 7  # the record limit (a 413 halves it)
        p = s.batch(10, cps[-1].seq)
        doc, got = parsed(p)
        assert got == recs[10:17] and doc["checkpoints"] == [] and (p.after, p.last, p.n) == (10, 17, 7)
        s.batch_records = shipper.BATCH_RECORDS
        monkeypatch.setattr(shipper, "BATCH_BYTES", shipper.CHECKPOINT_BYTES + 20_000)  # the byte limit
        p = s.batch()
        doc, got = parsed(p)
        assert 0 < p.n < 40 and got == recs[:p.n] and len(p.body) <= shipper.BATCH_BYTES
        assert s.batch(40, cps[-1].seq) is None  # nothing after the head
    finally:
        s.conn.close()
        ch.conn.close()
