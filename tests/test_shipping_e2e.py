"""Two agent hosts (network namespaces, each with its own daemon and state dir) ship to one central
recorder (lab/central.py: real PostgreSQL + `python -m central serve`), through real faults.

- Both hosts' agents' sessions arrive; each host's records are in PostgreSQL exactly once, with
  the host's own hashes, and its chain verifies against its registered key.
- The daemon killed -9 while a large backlog ships: restarted, it resumes from the recorder's
  head, and still every record is there exactly once.
- The recorder killed: host 2's spool passes `spool_max`, its proxy refuses the unprivileged
  agent's connection (nothing reaches the echo server: checked on the server side), `status` and
  the metric say why; the recorder back, the spool drains, the same connection succeeds, and the
  refused attempt is on record on the host and on the server."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path

import psycopg
import pytest

from lab.central import Central
from lab.fleet import wire
from lab.instance import INTERLOCK, Instance
from lab.netns import Lab
from lab.testing import ECHO_PORT, SLOWDOWN, instance_name, wait_until
from recorder import records
from recorder.join import HostFiles

pytestmark = pytest.mark.datapath
AGENT_UID = 65533
AS_AGENT = ["setpriv", "--reuid", str(AGENT_UID), "--regid", str(AGENT_UID), "--clear-groups"]
SPOOL_MAX = 60
METRICS_PORT = 16290


@pytest.fixture(scope="module")
def central(lab):
    with Central(lab.b) as c:
        yield c


@pytest.fixture(scope="module")
def lab2(lab):
    with Lab("s2") as second:
        wire(second.a, lab.b)
        yield second


def policy(path: Path, echo_addr: str) -> str:
    path.write_text(f"targets:\n  echo: {{address: {echo_addr}, port: {ECHO_PORT}}}\n"
                    "rules:\n  - name: echo-ok\n    target: echo\n    decision: allow\n")
    return str(path)


def joined_instance(host, central: Central, tag: str, tmp: Path, **config) -> Instance:
    inst = Instance(host, instance_name(tag), policy=policy(tmp / f"{tag}-policy.yaml", central.host.addr4),
                    recorder={"server": central.url, **config.pop("recorder", {})}, **config)
    r = inst.host.run([*INTERLOCK, "join", "--state-dir", str(inst.state_dir), "--server", central.url,
                       "--token", central.token(), "--name", tag])
    assert r.returncode == 0, r.stderr
    return inst


@pytest.fixture(scope="module")
def hosts(lab, lab2, central, echo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    one = joined_instance(lab.a, central, "sh1", tmp)
    # Four workers whatever the CPU count: the full-spool test needs siblings that read the spool
    # depth on their own seconds (one failed in CI, admitting an agent after status said "full").
    two = joined_instance(lab2.a, central, "sh2", tmp, recorder={"spool_max": SPOOL_MAX},
                          metrics_address=f"127.0.0.1:{METRICS_PORT}", workers=4)
    try:
        one.start()
        two.start()
        yield one, two
    finally:
        for inst in (one, two):
            inst.close()


def agent_probe(inst: Instance, host: str) -> dict:
    r = inst.agent([*AS_AGENT, sys.executable, "-m", "lab.probe", "tcp", host, str(ECHO_PORT)], agent="bot")
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"ok": False, "error": "no result", "stdout": r.stdout, "stderr": r.stderr}


def host_id(inst: Instance) -> str:
    return HostFiles.load(inst.state_dir).host_id


def local_chain(inst: Instance) -> list[records.Record]:
    conn = sqlite3.connect(f"file:{inst.state_dir / 'recorder.db'}?mode=ro", uri=True, timeout=10)
    try:
        h = host_id(inst)
        return [records.Record(h, *r) for r in conn.execute(
            "SELECT seq, kind, body, hash FROM journal WHERE seq IS NOT NULL ORDER BY seq")]
    finally:
        conn.close()



def shipping(inst: Instance) -> dict:
    return inst.status().get("shipping") or {}


def drained(inst: Instance) -> bool:
    """Everything journaled is chained and acked (the daemon's own status)."""
    sh = shipping(inst)
    return bool(sh) and sh.get("unshipped") == 0 and sh.get("acked_seq") == sh.get("head_seq")


def assert_exactly_once(central: Central, inst: Instance) -> list[records.Record]:
    mine = local_chain(inst)
    theirs, cps, key = central.chain(host_id(inst))
    assert theirs == mine, f"{len(theirs)} on the server, {len(mine)} on the host"
    assert [r.seq for r in theirs] == list(range(1, len(theirs) + 1))
    assert [f for f in records.verify_chain(host_id(inst), theirs, cps, key) if f.problem != "unsigned"] == []
    return theirs


def sessions_on_server(central: Central, host: str) -> dict[str, str]:
    with psycopg.connect(central.dsn) as conn:
        return dict(conn.execute("SELECT id, outcome FROM sessions WHERE host_id = %s", (host,)).fetchall())


def test_two_hosts_ship_their_agents_sessions_exactly_once(hosts, lab, central, echo):
    one, two = hosts
    for inst in (one, two):
        r = agent_probe(inst, lab.b.addr4)
        assert r["ok"], (r, inst.log.read_text()[-2000:])
    for inst in (one, two):
        assert wait_until(lambda i=inst: drained(i), 30), (shipping(inst), inst.log.read_text()[-2000:])
        s = wait_until(lambda i=inst: [x for x in i.sessions() if x["uid"] == AGENT_UID and x["outcome"] == "closed"], 10)
        assert s
        assert wait_until(lambda i=inst: drained(i), 30)
        theirs = assert_exactly_once(central, inst)
        assert sessions_on_server(central, host_id(inst)).get(s[-1]["id"]) == "closed"
        assert {"session-open", "session-close", "event"} <= {r.kind for r in theirs}
    assert host_id(one) != host_id(two)


def test_a_daemon_killed_mid_batch_resumes_and_loses_nothing(hosts, lab, central):
    one, _ = hosts
    db = sqlite3.connect(str(one.state_dir / "recorder.db"), timeout=10, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        for i in range(20000):
            db.execute("INSERT INTO events (at, kind, session, data) VALUES (?, 'backlog', NULL, ?)",
                       (time.time(), json.dumps({"i": i})))
        db.execute("COMMIT")
    finally:
        db.close()
    acked = lambda: shipping(one).get("acked_seq", 0)  # noqa: E731
    start = acked()
    assert wait_until(lambda: acked() > start, 20)
    one.daemon.kill()  # SIGKILL: the proxy dies with it (PR_SET_PDEATHSIG)
    one.daemon.wait(timeout=10)
    with psycopg.connect(central.dsn) as conn:
        at_kill = conn.execute("SELECT seq FROM chain_heads WHERE host_id = %s", (host_id(one),)).fetchone()[0]
    assert at_kill < start + 20000, "the backlog had shipped before the kill: it did not land mid-batch"
    one.start()
    r = agent_probe(one, lab.b.addr4)  # control: the restarted host works and ships
    assert r["ok"], r
    assert wait_until(lambda: drained(one), 60), shipping(one)
    theirs = assert_exactly_once(central, one)
    assert sum(1 for x in theirs if x.kind == "event" and json.loads(x.body)["kind"] == "backlog") == 20000


def metrics(inst: Instance) -> dict[str, float]:
    fetch = f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', timeout=5).read().decode())"
    r = inst.host.run([sys.executable, "-c", fetch])
    assert r.returncode == 0, r.stderr[-2000:]
    pairs = (line.split(" ") for line in r.stdout.splitlines() if line.startswith("interlock_recorder_"))
    return {k: float(v) for k, v in pairs}


def test_a_full_spool_refuses_the_agent_until_the_recorder_takes_its_records(hosts, lab, central, echo):
    _, two = hosts
    assert wait_until(lambda: drained(two), 30)
    ok = agent_probe(two, lab.b.addr4)  # control before: allowed, and it reaches the server
    assert ok["ok"], ok
    central.kill_server()
    try:
        db = sqlite3.connect(str(two.state_dir / "recorder.db"), timeout=10, isolation_level=None)
        try:  # what a busy host records while the recorder is away
            for i in range(SPOOL_MAX + 5):
                db.execute("INSERT INTO events (at, kind, session, data) VALUES (?, 'busy', NULL, ?)",
                           (time.time(), json.dumps({"i": i})))
        finally:
            db.close()
        reason = wait_until(lambda: (two.status()["recorder"].get("failed") or "").startswith("spool full") and
                            two.status()["recorder"]["failed"], 10)
        assert reason and f"records not shipped to {central.url}" in reason, two.status()["recorder"]
        sh = shipping(two)
        assert sh["unshipped"] > SPOOL_MAX and sh["last_error"] and sh["lag_seconds"] > 0
        m = metrics(two)
        assert m["interlock_recorder_unshipped_records"] > SPOOL_MAX and m["interlock_recorder_failed"] == 1
        text = two.cli("status").stdout
        assert "spool full" in text and "unshipped" in text
        before = len(echo.seen("tcp"))
        refused = agent_probe(two, lab.b.addr4)
        assert not refused["ok"], refused
        time.sleep(0.5 * SLOWDOWN)
        assert len(echo.seen("tcp")) == before  # server side: nothing arrived
    finally:
        central.start_server()
    assert wait_until(lambda: two.status()["recorder"]["state"] == "ok", 30), (shipping(two), two.status()["recorder"])
    again = agent_probe(two, lab.b.addr4)  # control after: the same connection works again
    assert again["ok"], again
    assert len(echo.seen("tcp")) == before + 1
    assert wait_until(lambda: drained(two), 30)
    theirs = assert_exactly_once(central, two)
    refusals = [s for s in two.sessions() if s["outcome"] == "recorder-error" and s["uid"] == AGENT_UID]
    assert refusals and "spool full" in refusals[-1]["detail"]
    assert wait_until(lambda: drained(two), 30)
    assert sessions_on_server(central, host_id(two)).get(refusals[-1]["id"]) == "recorder-error"
    kinds = [json.loads(r.body)["kind"] for r in theirs if r.kind == "event"]
    assert "recorder-failed" in kinds and "recorder-recovered" in kinds
