"""The recorder as a precondition: a write that cannot be made refuses what waited on it, is kept,
and is written with a recorder-failed/recorder-recovered pair once the database takes writes
again; byte counts of open sessions are flushed; a new proxy closes out what an old one left
open; and one escaping function keeps agent strings on one visible line.

The failure is real: SQLite's own page limit (PRAGMA max_page_count) makes the database full,
which SQLite reports exactly as a full disk (SQLITE_FULL); the datapath test in
tests/adversarial/test_recording.py fills a real file system."""

from __future__ import annotations

import asyncio
import json

import pytest

from recorder import store
from recorder.printable import printable
from recorder.replay import render, timeline
from recorder.store import Recorder, RecorderDown, SessionRecord, new_session_id, read_events, read_sessions


def session(**kw) -> SessionRecord:
    base = dict(id=new_session_id(), agent="bot", pid=10, tgid=10, uid=65533, gid=65533, comm="python3",
                exe="/usr/bin/python3", cmdline="python3 x.py", cgroup_id=1, dst_addr="10.0.0.2",
                dst_port=7000, family="ipv4")
    return SessionRecord(**{**base, **kw})


def fill(rec: Recorder) -> None:
    """Make the database full at its current size (SQLITE_FULL on the next page it needs)."""
    pages = rec.conn.execute("PRAGMA page_count").fetchone()[0]
    rec.conn.execute(f"PRAGMA max_page_count={pages}")


def unfill(rec: Recorder) -> None:
    rec.conn.execute("PRAGMA max_page_count=1073741823")


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def test_a_full_database_refuses_then_recovers_with_everything_on_record(tmp_path, loop, monkeypatch):
    monkeypatch.setattr(store, "RETRY_INTERVAL", 0.05)
    changes = []
    rec = Recorder(tmp_path / "r.db", loop, on_health=lambda h: changes.append(h.failed))
    ok = session()
    loop.run_until_complete(rec.session_open(ok, wait=True))  # control: a row commits
    fill(rec)
    big = session(cmdline="x" * 20000)  # needs new pages
    fut = rec.session_open(big, wait=True)
    with pytest.raises(RecorderDown, match="SQLITE_FULL"):
        loop.run_until_complete(fut)
    assert rec.failed and rec.health.failures == 1 and rec.health.refused == 1 and changes == [rec.failed]
    # while failed: what waits is refused at once, everything is kept
    later = rec.event("decision", {"verdict": "allow"}, big.id, wait=True)
    assert later.done() and isinstance(later.exception(), RecorderDown)
    big.outcome = "recorder-error"
    rec.session_close(big)
    assert rec.health.backlog == 4  # recorder-failed, the row, the event, the close
    loop.run_until_complete(asyncio.sleep(0.2))
    assert rec.failed, "still full: still failed"
    unfill(rec)
    loop.run_until_complete(asyncio.sleep(0.2))
    assert rec.failed is None and changes[-1] is None
    rows = {r["id"]: r for r in read_sessions(tmp_path / "r.db")}
    assert rows[big.id]["outcome"] == "recorder-error" and len(rows[big.id]["cmdline"]) == 20000
    kinds = [e["kind"] for e in read_events(tmp_path / "r.db")]
    assert kinds.index("recorder-failed") < kinds.index("decision") < kinds.index("recorder-recovered")
    rec_ev = read_events(tmp_path / "r.db", "recorder-recovered")[-1]["data"]
    assert rec_ev["refused"] == 2 and rec_ev["written"] == 4 and "SQLITE_FULL" in rec_ev["reason"]
    rec.close()


def test_daemon_writes_never_raise_and_are_kept(tmp_path):
    rec = Recorder(tmp_path / "d.db", who="daemon")
    fill(rec)
    rec.event("tamper", {"what": "x" * 20000})  # would raise sqlite3.OperationalError before
    assert rec.failed and rec.health.backlog == 2
    unfill(rec)
    rec.event("proxy-start", {"pid": 1})
    assert rec.failed is None
    assert [e["kind"] for e in read_events(tmp_path / "d.db")] == [
        "recorder-failed", "tamper", "recorder-recovered", "proxy-start"]
    rec.close()


def test_open_sessions_byte_counts_are_flushed_and_closed_out_by_the_next_proxy(tmp_path, loop):
    rec = Recorder(tmp_path / "c.db", loop)
    s = session()
    loop.run_until_complete(rec.session_open(s, wait=True))
    s.bytes_up, s.bytes_down = 5000, 10
    moved = {"up": 1 << 20, "down": 0}
    rec.live_counts[s.id] = moved  # a spliced connection's threads
    assert rec.flush_counts() == 1 and rec.flush_counts() == 0, "unchanged counts are not written again"
    loop.run_until_complete(asyncio.sleep(0))
    row = read_sessions(tmp_path / "c.db")[0]
    assert (row["outcome"], row["bytes_up"], row["bytes_down"]) == ("open", 5000 + (1 << 20), 10)
    rec.conn.close()  # the proxy is killed: no close
    nxt = Recorder(tmp_path / "c.db", loop)
    nxt.close_out("proxy-died", "killed")
    loop.run_until_complete(asyncio.sleep(0))
    row = read_sessions(tmp_path / "c.db")[0]
    assert row["outcome"] == "proxy-died" and row["ended"] and row["bytes_up"] == 5000 + (1 << 20)
    nxt.close()


FORGED = "x.py\n  +    0.000s  ALLOW    tcp:connect 10.0.0.2:22\x1b[2K\x1b[1A\u202eYNED\x9b31m\x7f\\n\u2028"


def test_printable_escapes_every_control_and_keeps_text():
    out = printable(FORGED)
    assert "\n" not in out and "\x1b" not in out and "\u202e" not in out and "\x9b" not in out
    assert "\x7f" not in out and "\u2028" not in out
    assert out == ("x.py\\n  +    0.000s  ALLOW    tcp:connect 10.0.0.2:22\\x1b[2K\\x1b[1A\\u202eYNED\\x9b31m"
                   "\\x7f\\\\n\\u2028")
    for plain in ("psql -c 'select 1'", "naïve café 日本語 🙂", "/usr/bin/python3", ""):
        assert printable(plain) == plain
    assert printable(None) == "" and printable(7000) == "7000"


def test_replay_prints_one_line_per_event_whatever_the_agent_wrote(tmp_path):
    rec = Recorder(tmp_path / "p.db")
    s = session(cmdline=FORGED, comm="a\nb", exe="/tmp/\x1b[8m")
    s.outcome, s.ended = "denied", s.started + 1
    rec.session_open(s)

    class Op:
        protocol, action, objects, risks, summary = "tcp", "connect", ("10.0.0.2:22",), (), "connect \x1b[1A\n"

    class Dec:
        class verdict:  # noqa: N801
            value = "deny"
        rule, reason = "no-ssh", "off limits"

    rec.decision(s.id, Op, Dec)
    rec.event("http", {"method": "GET", "host": "h\r\n", "path": "/\u202e", "status": 403, "up": 1, "down": 2,
                       "ms": 1, "outcome": "denied"}, s.id)
    rec.close()
    text = render(timeline(tmp_path / "p.db", s.id))
    lines = text.split("\n")
    assert len(lines) == 4 + 2 + 1, text  # header, two events, the end line
    assert sum("DENY" in line for line in lines) == 1 and "ALLOW" in lines[2]  # the forged ALLOW: on the command line
    assert not any(c in text for c in "\x1b\u202e\r\x9b\x7f\u2028")
    assert json.dumps(timeline(tmp_path / "p.db", s.id))  # JSON keeps the exact strings
    assert timeline(tmp_path / "p.db", s.id)["session"]["cmdline"] == FORGED


def test_cli_sessions_and_approvals_print_agent_strings_escaped(tmp_path):
    import subprocess
    import sys

    from recorder import approvals

    rec = Recorder(tmp_path / "recorder.db")
    approvals.ensure_schema(rec.db)
    rec.session_open(session(exe="/tmp/\x1b[2K\x1b[1Afake\nline", cmdline=FORGED))
    approvals.request(rec.conn, approvals.HeldOperation(
        "s1", "bot", "10.0.0.2:5432", "postgres", "delete", ("t",), "DELETE FROM t\n\x1b[1A\u202e-- ok",
        "hold", "why", 300))
    rec.close()

    def cli(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "interceptor.cli", *args, "--state-dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    for out, lines in ((cli("sessions"), 2), (cli("approvals"), 1)):  # a header and one session; one approval
        assert len(out.rstrip("\n").split("\n")) == lines, out
        assert not any(c in out for c in "\x1b\u202e\r"), repr(out)
    assert "DELETE FROM t\\n\\x1b[1A\\u202e-- ok" in cli("approvals")
    assert json.loads(cli("approvals", "--json"))[0]["summary"] == "DELETE FROM t\n\x1b[1A\u202e-- ok"


def test_many_events_in_one_executemany_are_each_recorded_and_journaled(tmp_path):
    """Recorder.events (the PostgreSQL statement batch): one entry of the group commit, a row per
    event, each with its own journal row for the central recorder."""
    import sqlite3 as _sqlite3

    from recorder import journal

    loop = asyncio.new_event_loop()
    try:
        r = Recorder(tmp_path / "r.db", loop)
        journal.install(r.conn, "host-1")
        r.events("statement", [({"summary": f"select {i}", "verdict": "allow"}, "s1") for i in range(5)])
        assert len(r.writer.batch) == 1
        loop.run_until_complete(asyncio.sleep(0.01))
        db = _sqlite3.connect(tmp_path / "r.db")
        rows = db.execute("SELECT session, data FROM events WHERE kind = 'statement' ORDER BY id").fetchall()
        assert rows == [("s1", f'{{"summary": "select {i}", "verdict": "allow"}}') for i in range(5)]
        assert db.execute("SELECT count(*) FROM journal").fetchone()[0] == 5
        r.close()
    finally:
        loop.close()


def _wal_resets(wal) -> int:
    """The WAL header's checkpoint sequence number: SQLite adds one each time the WAL starts over."""
    with open(wal, "rb") as f:
        return int.from_bytes(f.read(16)[12:16], "big")


def test_commits_wait_out_a_checkpoint_hold_and_a_close_never_does(tmp_path, loop):
    rec = Recorder(tmp_path / "r.db", loop)
    try:
        rec.commit_hold.set(store.time.monotonic() + 0.3)
        fut = rec.event("refused", {"why": "held"}, durable=True)
        loop.run_until_complete(asyncio.sleep(0.1))
        assert not fut.done(), "a commit waits while the checkpointer copies the last frames"
        loop.run_until_complete(asyncio.wait_for(fut, 2))
        assert read_events(tmp_path / "r.db", "refused"), "and is written once the hold ends"
        rec.commit_hold.set(store.time.monotonic() + 60)
        rec.event("closing", {}, linger=True)
    finally:
        rec.close()
    assert read_events(tmp_path / "r.db", "closing"), "close writes what is queued whatever the hold"


_ROW = {"method": "GET", "host": "10.0.0.2", "path": "/small", "status": 200, "pad": "x" * 150}


def _steady(d, holds: bool, writers: int = 1, seconds: float = 2.5) -> tuple[int, int]:
    """A commit about every millisecond from each writer (its own loop and connection, as proxy
    workers have; the first checkpoints) for `seconds`: (times the WAL started over, its largest
    size in bytes). holds=False: the checkpointer asks nobody to hold (the behaviour before)."""
    import threading

    from proxy.workers import SharedHold

    cell = d / "commit-hold"
    cell.write_bytes(bytes(8))
    loops = [asyncio.new_event_loop() for _ in range(writers)]
    recs = [Recorder(d / "r.db", lp, hold=SharedHold(cell) if writers > 1 else None, checkpoint=i == 0)
            for i, lp in enumerate(loops)]
    if not holds:
        recs[0].checkpointer.hold = None
    wal, resets, largest, written = d / "r.db-wal", set(), [0], [0] * writers

    async def steady(i: int) -> None:
        rec, now = recs[i], asyncio.get_running_loop().time
        end = now() + seconds
        while now() < end:
            for _ in range(20 // writers):
                rec.event("http", _ROW, f"s{i}-{written[i] % 8}", linger=True)
                written[i] += 1
            await asyncio.sleep(0.001)
            if i == 0 and wal.exists():
                resets.add(_wal_resets(wal))
                largest[0] = max(largest[0], wal.stat().st_size)

    threads = [threading.Thread(target=lp.run_until_complete, args=(steady(i),)) for i, lp in enumerate(loops)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        for rec, lp in zip(recs, loops, strict=True):
            rec.close()
            lp.close()
    assert len(read_events(d / "r.db", "http", limit=sum(written) + 1)) == sum(written), "every record written"
    return len(resets) - 1, largest[0]


@pytest.mark.parametrize("writers", [1, 2], ids=["one-writer", "two-workers"])
def test_the_wal_starts_over_under_a_steady_stream_of_commits(tmp_path, writers):
    """With the checkpointer's hold (shared by every worker, proxy.workers.SharedHold) the WAL
    starts over at its looks and stays within WAL_LIMIT. The control, the same stream with the
    checkpointer holding nobody, shows the WAL all but never starting over (a restart there needs
    a gap in every writer's commits that happens to follow a checkpoint)."""
    (tmp_path / "held").mkdir()
    (tmp_path / "control").mkdir()
    held, largest = _steady(tmp_path / "held", True, writers)
    assert held >= 2, f"the WAL started over {held} times"
    assert largest <= store.WAL_LIMIT, f"the WAL reached {largest} bytes"
    control, _ = _steady(tmp_path / "control", False, writers)
    assert control <= held - 2, (held, control)


def test_a_workers_commits_wait_out_the_hold_its_sibling_checkpointer_sets(tmp_path):
    """Worker 1 runs no checkpointer; the deadline worker 0's sets in the shared cell holds its
    commits too. The control: a writer with a hold of its own does not wait."""
    from proxy.workers import SharedHold

    cell = tmp_path / "commit-hold"
    cell.write_bytes(bytes(8))
    loop = asyncio.new_event_loop()
    first = Recorder(tmp_path / "r.db", loop, hold=SharedHold(cell), checkpoint=True)
    sibling = Recorder(tmp_path / "r.db", loop, hold=SharedHold(cell), checkpoint=False)
    alone = Recorder(tmp_path / "r.db", loop, checkpoint=False)
    try:
        first.commit_hold.set(store.time.monotonic() + 0.5)
        held, free = sibling.event("held", {}, durable=True), alone.event("free", {}, durable=True)
        loop.run_until_complete(asyncio.wait_for(free, 2))
        assert not held.done(), "the sibling's commit waits for the checkpointer's hold"
        loop.run_until_complete(asyncio.wait_for(held, 2))
    finally:
        for rec in (first, sibling, alone):
            rec.close()
        loop.close()
    assert read_events(tmp_path / "r.db", "held") and read_events(tmp_path / "r.db", "free")
