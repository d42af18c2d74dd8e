"""PostgreSQL cancels with two proxy workers (`workers: 2`): a CancelRequest is a new connection,
and SO_REUSEPORT hands it to either worker, whichever relays the session it names
(proxy/postgres/cancels.py). Real parts: a PostgreSQL 15 server on the lab's server host (its
log and pg_stat_activity are the server-side evidence), psycopg and psql run as agents under an
ordinary uid, the daemon with its hooks and two proxy workers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import pytest

from lab.instance import Instance
from lab.pg_cancel import SESSION, agent_py
from lab.postgres import Postgres
from lab.testing import SLOWDOWN, instance_name, wait_until
from recorder.store import worker_of

pytestmark = pytest.mark.datapath
PORT = 5442
CANCELS = 24  # each lands on a worker the kernel picks: about half on the other worker than the session's
POLICY = """\
rules:
  - name: no-cancels-for-mallory
    agent: mallory
    operation: cancel
    decision: deny
    reason: mallory may not cancel anyone's statements
  - name: hold-deletes
    risk: [delete-without-where]
    decision: approve
    timeout: 60s
default: allow
"""


# Raw CancelRequests (pid, key hex) sent one after the other: what the agent gets back on each
# ("" when the proxy closes it, which it does once the cancel is handled)
SEND = """
    import json, socket
    from proxy.postgres import wire
    out = []
    for pid, key in {cancels}:
        c = socket.create_connection(("{host}", {port}), timeout=60)
        c.sendall(wire.cancel_request(pid, bytes.fromhex(key)))
        out.append(c.recv(10).hex())
        c.close()
    print(json.dumps(out))
"""
RESTART_DELAY = 15  # seconds a killed worker stays gone (proxy_restart_delay)


@pytest.fixture(scope="module")
def pg(lab):
    # the backend pid on every log line: which session a server-side cancel ended
    server = Postgres(lab.b, port=PORT, settings={"log_line_prefix": "pid=%p "})
    try:
        server.start()
        server.psql("CREATE TABLE holdme (id int); INSERT INTO holdme VALUES (1), (2);"
                    "GRANT ALL ON holdme TO PUBLIC")
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def inst(lab, pg, tmp_path_factory):
    policy = tmp_path_factory.mktemp("cancelpolicy") / "policy.yaml"
    policy.write_text(POLICY)
    i = Instance(lab.a, instance_name("cw"), proxy_port=15711, dns_port=15763, policy=str(policy), workers=2,
                 proxy_restart_delay=RESTART_DELAY)
    try:
        i.start()
        assert len(i.status()["proxy_pids"]) == 2
        yield i
    finally:
        i.close()


@pytest.fixture
def share():
    """A directory the unprivileged agent and the test both use to signal each other."""
    d = Path(tempfile.mkdtemp(prefix="interlock-cw-"))
    os.chmod(d, 0o777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)




def server_cancels(pg: Postgres) -> dict[int, list[str]]:
    """Server side: backend pid → the statements it reports cancelled at a client's request."""
    out: dict[int, list[str]] = {}
    lines = pg.log.read_text(errors="replace").splitlines()
    for n, line in enumerate(lines):
        m = re.match(r"pid=(\d+) ERROR:  canceling statement due to user request", line)
        if m:
            nxt = lines[n + 1] if n + 1 < len(lines) else ""
            out.setdefault(int(m.group(1)), []).append(nxt.split("STATEMENT:", 1)[-1].strip())
    return out


def who(sessions: dict[str, dict], event: dict) -> tuple[str, int]:
    """The agent and uid of the connection an event was recorded on (from the kernel, at accept)."""
    row = sessions[event["session"]]
    return row["agent"], row["uid"]


def dsn(lab) -> str:
    return f"host={lab.b.addr4} port={PORT} user=postgres dbname=postgres"


def running_session_key(share: Path, pg: Postgres) -> dict:
    """The key SESSION wrote once connected ({"pid", "key" hex}), after its statement is running."""
    keyfile = share / "key.json"
    assert wait_until(lambda: keyfile.exists() and keyfile.read_text(), timeout=120), "no session"
    key = json.loads(keyfile.read_text())
    assert wait_until(lambda: pg.psql(f"select state from pg_stat_activity where pid = {key['pid']}") == "active",
                      timeout=60)
    return key


def test_every_cancel_takes_effect_whichever_worker_accepts_it(inst, lab, pg):
    out = agent_py(inst, """
        import json, signal, subprocess, threading, time, psycopg
        DSN = "{dsn}"
        def running(mon, marker):
            deadline = time.monotonic() + 60 * {slow}
            while time.monotonic() < deadline:
                rows = mon.execute("select pid from pg_stat_activity where state = 'active' and pid <> pg_backend_pid()"
                                   " and query like %s", ("%" + marker + "%",)).fetchall()
                if rows:
                    return rows[0][0]
                time.sleep(0.05)
        res = []
        with psycopg.connect(DSN, autocommit=True) as mon:
            for i in range({n}):
                marker = f"cw-{{i}}-"
                sql = f"select pg_sleep({{30 * {slow}}}) /* {{marker}} */"
                how = ("cancel", "cancel_safe", "psql")[i % 3]
                if how == "psql":  # psql's own cancel: SIGINT sends a CancelRequest on a new connection
                    p = subprocess.Popen(["psql", DSN, "-X", "-c", sql], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
                    pid = running(mon, marker)
                    p.send_signal(signal.SIGINT)
                    _, err = p.communicate(timeout=120 * {slow})
                    ok = "canceling statement due to user request" in err
                    res.append({{"i": i, "how": how, "pid": pid, "canceled": ok, "detail": err.strip()[-300:]}})
                else:
                    with psycopg.connect(DSN, autocommit=True) as c:
                        pid = c.info.backend_pid
                        def fire():
                            if running(mon, marker) == pid:
                                getattr(c, how)()
                        threading.Thread(target=fire).start()
                        try:
                            c.execute(sql)
                            res.append({{"i": i, "how": how, "pid": pid, "canceled": False, "detail": "completed"}})
                        except psycopg.Error as e:
                            ok = e.sqlstate == "57014" and "user request" in (e.diag.message_primary or "")
                            res.append({{"i": i, "how": how, "pid": pid, "canceled": ok, "detail": str(e)[:300]}})
                if not res[-1]["canceled"]:
                    break  # the test fails; don't wait out the others
        print(json.dumps(res))
    """, dsn=dsn(lab), slow=SLOWDOWN, n=CANCELS)
    assert len(out) == CANCELS and all(r["canceled"] for r in out), out
    # server side: each backend ended exactly its statement, at a client's request (57014)
    ended = wait_until(lambda: (c := server_cancels(pg)) and all(r["pid"] in c for r in out) and c)
    for r in out:
        assert any(f"cw-{r['i']}-" in s for s in ended.get(r["pid"], [])), (r, ended.get(r["pid"]))
    # on record: every cancel judged (the cancelling connection's identity) and where it went
    decisions = [e for e in inst.events("decision") if e["data"]["action"] == "cancel"]
    assert len(decisions) >= CANCELS and all(e["data"]["verdict"] == "allow" for e in decisions[-CANCELS:])
    sessions = {s["id"]: s for s in inst.sessions()}
    assert all(who(sessions, e) == ("bot", 65533) for e in decisions[-CANCELS:])
    routed = inst.events("cancel-routed")
    # both ways were taken: cancels the session's own worker accepted, and cancels the other did
    assert 0 < len(routed) < CANCELS, f"{len(routed)} of {CANCELS} cancels crossed workers"
    statements = inst.events("statement")
    for e in routed:
        assert worker_of(e["session"]) != e["data"]["worker"]
        # the worker it went to is the one relaying the session whose statement it ended
        owners = {worker_of(s["session"]) for s in statements if "pg_sleep" in json.dumps(s["data"])
                  and any(f"cw-{r['i']}-" in json.dumps(s["data"]) for r in out if r["pid"] == e["data"]["backend"])}
        assert owners == {e["data"]["worker"]}, (e, owners)


def test_forged_keys_and_another_agents_cancel_end_nothing(inst, lab, pg, share):
    # bot's session (raw protocol: the agent sees the key the proxy gave it) runs a long
    # statement; forged keys naming each worker, bot's key with another backend's pid, and
    # bot's real key sent by mallory (whose cancels the policy denies) all cancel nothing.
    # The control: bot's own cancel with the same key ends it.
    result: dict = {}

    def session():
        result["out"] = agent_py(inst, SESSION, host=lab.b.addr4, port=PORT, slow=SLOWDOWN, share=share,
                                 marker="forged-target")

    t = threading.Thread(target=session)
    t.start()
    try:
        key = running_session_key(share, pg)
        pid = key["pid"]
        real = bytes.fromhex(key["key"])
        forged = []
        for owner in (0, 1):  # a forged key naming each worker: the one that did not issue it, and the one that did
            while True:
                k = os.urandom(len(real))
                if int.from_bytes(k, "big") % 2 == owner and k != real:
                    forged.append((pid, k.hex()))
                    break
        forged.append((pid + 1, real.hex()))  # the right key for another backend
        before = len([e for e in inst.events("decision") if e["data"]["action"] == "cancel"])
        for agent, cancels in (("bot", forged * 3), ("mallory", [(pid, real.hex())] * 4)):
            assert agent_py(inst, SEND, agent=agent, host=lab.b.addr4, port=PORT,
                            cancels=json.dumps(cancels)) == [""] * len(cancels)
            # server side: still running, nothing cancelled
            assert pg.psql(f"select state from pg_stat_activity where pid = {pid}") == "active", agent
            assert pid not in server_cancels(pg)
        assert t.is_alive()
        # on record: every attempt judged under the identity of the connection that sent it
        cancels_seen = [e for e in inst.events("decision") if e["data"]["action"] == "cancel"][before:]
        sessions = {s["id"]: s for s in inst.sessions()}
        whom = [who(sessions, e) for e in cancels_seen]
        assert whom.count(("bot", 65533)) == 9 and whom.count(("mallory", 65533)) == 4, whom
        assert all(e["data"]["verdict"] == ("deny" if w[0] == "mallory" else "allow")
                   for e, w in zip(cancels_seen, whom, strict=True))
        refused = [s for s in inst.sessions() if s["outcome"] in ("refused", "denied") and s["agent"] in ("bot", "mallory")]
        assert sum("did not issue" in (s["detail"] or "") for s in refused) >= 9
        assert sum("no-cancels-for-mallory" in (s["detail"] or "") for s in refused) >= 4
        # the control: bot's own cancel with its key, through whichever worker
        assert agent_py(inst, SEND, host=lab.b.addr4, port=PORT, cancels=json.dumps([(pid, real.hex())])) == [""]
        t.join(timeout=120 * SLOWDOWN)
        assert result["out"] == ["57014"], result
        assert any("forged-target" in s for s in wait_until(lambda: server_cancels(pg).get(pid)))
    finally:
        t.join(timeout=300 * SLOWDOWN)


def test_cancel_gives_up_a_held_statement_whichever_worker_accepts_it(inst, lab, pg, share):
    # a delete held for a human; the agent's cancel, on either worker, gives the hold up (57014)
    rounds = 6
    result: dict = {}

    def session():
        result["out"] = agent_py(inst, """
            import json, os, threading, time, psycopg
            res = []
            with psycopg.connect("{dsn}", autocommit=True) as c:
                for i in range({rounds}):
                    def fire():
                        while not os.path.exists(f"{share}/go-{{i}}"):
                            time.sleep(0.05)
                        c.cancel()
                    threading.Thread(target=fire).start()
                    open(f"{share}/held-{{i}}", "w").close()
                    try:
                        c.execute("delete from holdme")
                        res.append(["ran"])
                    except psycopg.Error as e:
                        res.append([e.sqlstate, e.diag.message_detail or ""])
            print(json.dumps(res))
        """, dsn=dsn(lab), rounds=rounds, share=share)

    t = threading.Thread(target=session)
    t.start()
    try:
        for i in range(rounds):
            assert wait_until(lambda i=i: (share / f"held-{i}").exists(), timeout=120)
            # the hold is in place (its approval requested) before the agent cancels
            assert wait_until(lambda i=i: len(inst.events("approval-requested")) == i + 1, timeout=60), i
            (share / f"go-{i}").touch()
            assert wait_until(lambda i=i: len(inst.events("hold-canceled")) == i + 1, timeout=60), i
        t.join(timeout=120 * SLOWDOWN)
        out = result["out"]
        assert len(out) == rounds and all(r[0] == "57014" and "held for approval" in r[1] for r in out), out
        assert pg.psql("select count(*) from holdme") == "2", "server side: nothing deleted"
        assert len(inst.events("hold-canceled")) == rounds
    finally:
        t.join(timeout=300 * SLOWDOWN)


def test_a_cancel_whose_worker_died_cancels_nothing(inst, lab, pg, share):
    # The worker relaying a session is killed; the server's statement runs on. The agent's
    # cancels with the session's key now land on the surviving worker, which cannot ask the dead
    # one: refused, on record (fail closed); and after the successor starts, its empty map knows
    # no such key either.
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("out", agent_py(
        inst, SESSION, host=lab.b.addr4, port=PORT, slow=SLOWDOWN, share=share, marker="orphan")))
    t.start()
    pid = None
    try:
        key = running_session_key(share, pg)
        pid = key["pid"]
        live = [s for s in inst.sessions("bot") if s["outcome"] == "open" and s["dst_port"] == PORT]
        assert len(live) == 1, live
        worker = str(worker_of(live[0]["id"]))
        os.kill(inst.status()["proxy_workers"][worker], signal.SIGKILL)
        t.join(timeout=60 * SLOWDOWN)
        assert result["out"] in (["EOF"], ["reset"]), result  # the agent's connection died with its worker
        assert wait_until(lambda: worker not in inst.status()["proxy_workers"], timeout=30)
        cancels = [(pid, key["key"])] * 6
        assert agent_py(inst, SEND, host=lab.b.addr4, port=PORT, cancels=json.dumps(cancels)) == [""] * 6
        still_gone = worker not in inst.status()["proxy_workers"]
        # server side: the orphaned statement still runs, nobody cancelled it
        assert pg.psql(f"select state from pg_stat_activity where pid = {pid}") == "active"
        assert pid not in server_cancels(pg)
        refused = [s for s in inst.sessions("bot") if s["outcome"] == "refused" and s["dst_port"] == PORT]
        gone = [s for s in refused if f"proxy worker {worker}, which holds that key's session, cannot be asked"
                in (s["detail"] or "")]
        if still_gone:  # every cancel landed on the survivor while the owner was gone
            assert len(gone) == 6, refused
        # once the successor runs, the key is still nobody's
        assert wait_until(lambda: worker in inst.status()["proxy_workers"], timeout=RESTART_DELAY + 30)
        before = len(refused)
        assert agent_py(inst, SEND, host=lab.b.addr4, port=PORT, cancels=json.dumps(cancels)) == [""] * 6
        refused = [s for s in inst.sessions("bot") if s["outcome"] == "refused" and s["dst_port"] == PORT]
        assert len(refused) == before + 6 and all("did not issue" in s["detail"] for s in refused[before:]), refused
        assert pg.psql(f"select state from pg_stat_activity where pid = {pid}") == "active"
        assert pid not in server_cancels(pg)
        # control: a new session's cancel works again through either worker
        control = agent_py(inst, """
            import json, threading, time, psycopg
            with psycopg.connect("{dsn}", autocommit=True) as c, psycopg.connect("{dsn}", autocommit=True) as mon:
                def fire():  # once the server runs it
                    while not mon.execute("select 1 from pg_stat_activity where pid = %s and state = 'active'",
                                          (c.info.backend_pid,)).fetchall():
                        time.sleep(0.05)
                    c.cancel()
                threading.Thread(target=fire).start()
                try:
                    c.execute(f"select pg_sleep({{60 * {slow}}})")
                    print(json.dumps("completed"))
                except psycopg.Error as e:
                    print(json.dumps(e.sqlstate))
        """, dsn=dsn(lab), slow=SLOWDOWN)
        assert control == "57014"
    finally:
        if pid is not None:
            pg.psql(f"select pg_terminate_backend({pid})")
        t.join(timeout=120 * SLOWDOWN)
