"""Shipping to a real central recorder (lab/central.py: PostgreSQL + `python -m central serve` on the
lab's server host), from a shipper on the agent host's namespace: `interlock join` (the CA pinned
by the token, keys 0600, a used token refused), then records shipped through real faults — the
recorder killed -9 mid-stream, the shipping process killed -9 mid-batch, the link cut with
`ip link set … down`, the recorder restored from an older state (409 gap) — and afterwards
every record is in PostgreSQL exactly once, with the same hashes, and the chain verifies."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest

from lab.central import Central
from lab.testing import wait_until
from recorder import journal, records
from recorder.join import HostFiles
from recorder.store import Recorder

ROOT = Path(__file__).resolve().parents[1]
INTERLOCK = [sys.executable, "-m", "interceptor.cli"]


@pytest.fixture(scope="module")
def central(lab):
    with Central(lab.b) as c:
        yield c


def join(lab, central, state: Path, token: str | None = None) -> subprocess.CompletedProcess:
    return lab.a.run([*INTERLOCK, "join", "--state-dir", str(state), "--server", central.url,
                      "--token", token or central.token(), "--name", state.name])



def test_join_pins_the_ca_by_the_token_and_writes_root_only_files(lab, central, tmp_path):
    token = central.token()
    forged = token[:-64] + ("0" if token[-64] != "0" else "1") + token[-63:]
    r = join(lab, central, tmp_path / "mitm", forged)
    assert r.returncode == 2 and "does not match the token" in r.stderr, r.stderr
    assert not (tmp_path / "mitm" / "recorder").exists()
    r = join(lab, central, tmp_path / "one", token)
    assert r.returncode == 0, r.stderr
    files = HostFiles.load(tmp_path / "one")
    assert files.server == central.url and files.ca_sha256 == central.ca_sha256 and files.host_id.startswith("h-")
    assert stat.S_IMODE(files.dir.stat().st_mode) == 0o700
    for f in ("host.json", "ca.pem", "tls.key", "tls.crt", "signing.key"):
        st = (files.dir / f).stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0, f
    with psycopg.connect(central.dsn) as conn:
        key = conn.execute("SELECT signing_key FROM hosts WHERE host_id = %s", (files.host_id,)).fetchone()[0]
    assert key == records.public_key_hex(records.load_signing_key(files.signing_key))  # only the public half left
    r = join(lab, central, tmp_path / "two", token)  # single use
    assert r.returncode == 2 and "already used" in r.stderr, r.stderr
    assert not (tmp_path / "two" / "recorder").exists()
    r = join(lab, central, tmp_path / "one")
    assert r.returncode == 2 and "already joined" in r.stderr


_SHIP = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from recorder.join import HostFiles
    from recorder.shipper import Shipping
    state = Path(sys.argv[1])
    s = Shipping(state / "recorder.db", HostFiles.load(state))
    s.start()
    print("ready", flush=True)
    while True:
        time.sleep(0.5)
        print(s.status(), flush=True)
""")


class ShipProcess:
    """The chainer and shipper of a daemon, alone in a process on the agent host (killable -9)."""

    def __init__(self, lab, state: Path):
        self.lab, self.state = lab, state
        self.log = state / "ship.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = self.lab.a.popen([sys.executable, "-c", _SHIP, str(self.state)], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert wait_until(lambda: b"ready" in self.log.read_bytes() or self.proc.poll() is not None, 30)
        assert self.proc.poll() is None, self.log.read_text()[-2000:]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def write(rec: Recorder, n: int, tag: str) -> None:
    rec.conn.execute("BEGIN")
    for i in range(n):
        rec.conn.execute("INSERT INTO events (at, kind, session, data) VALUES (?, ?, NULL, ?)",
                         (time.time(), "fault-test", json.dumps({"tag": tag, "i": i})))
    rec.conn.execute("COMMIT")


def settled(read, quiet: float = 1.0, tries: int = 10) -> int:
    """`read()` once it returned the same value `quiet` seconds apart (at most `tries` times)."""
    last = read()
    for _ in range(tries):
        time.sleep(quiet)
        now = read()
        if now == last:
            return now
        last = now
    return last


def shipped(rec: Recorder) -> int:
    sp = journal.spool(rec.conn)
    return sp.acked_seq if sp else 0


def test_every_record_arrives_exactly_once_through_kills_a_cut_link_and_a_restored_recorder(lab, central, tmp_path):
    state = tmp_path / "host"
    assert join(lab, central, state).returncode == 0
    host = HostFiles.load(state).host_id
    rec = Recorder(state / "recorder.db", who="daemon")
    journal.install(rec.conn, host)
    ship = ShipProcess(lab, state)
    ship.start()
    try:
        write(rec, 50, "warm-up")
        assert wait_until(lambda: shipped(rec) == 50, 15), ship.log.read_text()[-2000:]

        # the recorder killed -9 while a large backlog streams to it
        write(rec, 20000, "recorder-kill")
        assert wait_until(lambda: shipped(rec) > 50, 20)
        central.kill_server()
        at_kill = settled(lambda: shipped(rec))  # an ack the server sent just before it died may still land
        assert at_kill < 20050, "the backlog was gone before the kill: the kill did not land mid-stream"
        write(rec, 100, "while-recorder-down")
        time.sleep(2)
        assert shipped(rec) == at_kill  # nothing is acked while it is down
        central.start_server()
        assert wait_until(lambda: shipped(rec) > at_kill, 30)

        # the shipping process killed -9 mid-batch
        write(rec, 20000, "shipper-kill")
        before = shipped(rec)
        assert wait_until(lambda: shipped(rec) > before, 20)
        ship.kill()
        assert shipped(rec) < 40150, "the backlog was gone before the kill"
        write(rec, 100, "while-shipper-down")
        ship.start()

        # the link cut for a while
        veth = f"v{lab.a.name}"[:15]
        lab.a.run(["ip", "link", "set", veth, "down"], check=True)
        try:
            write(rec, 300, "link-down")
            cut = settled(lambda: shipped(rec))  # an answer already on the host may still be acked
            time.sleep(3)
            assert shipped(rec) == cut
        finally:
            lab.a.run(["ip", "link", "set", veth, "up"], check=True)
        total = rec.conn.execute("SELECT count(*) FROM journal").fetchone()[0]
        assert wait_until(lambda: shipped(rec) == total, 60), (shipped(rec), total, ship.log.read_text()[-2000:])

        # the recorder's database restored from an older state under a running recorder and shipper:
        # its chain ends 500 records earlier, and the next batch meets a 409 gap
        with psycopg.connect(central.dsn) as conn:
            back = total - 500
            h = conn.execute("SELECT hash FROM records WHERE host_id = %s AND seq = %s", (host, back)).fetchone()[0]
            conn.execute("DELETE FROM records WHERE host_id = %s AND seq > %s", (host, back))
            conn.execute("DELETE FROM checkpoints WHERE host_id = %s AND seq > %s", (host, back))
            conn.execute("UPDATE chain_heads SET seq = %s, hash = %s, signed_seq = LEAST(signed_seq, %s) WHERE host_id = %s",
                         (back, h, back, host))
        write(rec, 10, "after-restore")
        total += 10
        assert wait_until(lambda: shipped(rec) == total, 30), ship.log.read_text()[-2000:]
        with psycopg.connect(central.dsn) as conn:
            assert wait_until(lambda: conn.execute("SELECT signed_seq FROM chain_heads WHERE host_id = %s",
                                                   (host,)).fetchone()[0] == total, 10)
            gaps = conn.execute("SELECT count(*) FROM refusals WHERE claimed_host = %s AND status = 409", (host,)).fetchone()[0]
        assert gaps >= 1  # the shipper met the gap and resent from the recorder's head

        # revoked: refused, nothing more is stored, and the shipper says why (the spool keeps the records)
        central.cli("revoke", host, "--database", central.dsn, "--reason", "test")
        write(rec, 5, "after-revoke")
        assert wait_until(lambda: "was revoked" in ship.log.read_text(), 15), ship.log.read_text()[-1000:]
        assert shipped(rec) == total
    finally:
        ship.kill()
    mine = [records.Record(host, *r) for r in rec.conn.execute(
        "SELECT seq, kind, body, hash FROM journal WHERE seq IS NOT NULL ORDER BY seq")]
    theirs, cps, key = central.chain(host)
    assert len(theirs) == total and total < len(mine) <= total + 5
    assert theirs == mine[:total]  # every record once, in order, byte for byte, with the host's hashes
    assert records.verify_chain(host, theirs, cps, key) == []
    tags = [json.loads(r.body)["data"]["tag"] for r in theirs]
    assert tags.count("recorder-kill") == 20000 and tags.count("shipper-kill") == 20000 and tags.count("link-down") == 300
    rec.close()
