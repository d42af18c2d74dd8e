"""A PostgreSQL CancelRequest must obey the policy like any other operation (proxy/postgres/handler.py
`_cancel`, proxy/postgres/cancels.py), with two proxy workers as the default now has.

Attacks, by an agent under an ordinary uid that holds its own session's key:
- send the CancelRequest to another service it may reach, where no rule stops a cancel: the
  proxy judged it for that destination but forwarded it to the key's session's server, where a
  `cancel` deny rule names the target;
- cancel where the policy says `decision: approve` for `cancel`: it went through at once, no human
  asked.
Server-side evidence: the PostgreSQL server's log (the backend pid on every line) and
pg_stat_activity. Controls in each test: the same cancel where the policy allows it ends the
statement (57014)."""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from pathlib import Path

import pytest

from lab.instance import Instance
from lab.pg_cancel import SESSION, agent_py
from lab.postgres import Postgres
from lab.testing import SLOWDOWN, instance_name, wait_until

pytestmark = pytest.mark.datapath
PORT = 5461  # the PostgreSQL server the sessions use
ELSEWHERE = 5462  # another service on the same host the agents may reach
POLICY = """\
targets:
  prod-db:
    address: {addr}
    port: {port}
rules:
  - name: no-cancels-on-prod
    agent: bot
    target: prod-db
    operation: cancel
    decision: deny
    reason: statements on prod-db run to their end
  - name: cancels-need-a-human
    agent: carol
    operation: cancel
    decision: approve
    timeout: 120s
default: allow
"""
# One CancelRequest to host:port; what came back before the proxy closed it ("" = nothing)
SEND = """
    import json, socket
    from proxy.postgres import wire
    c = socket.create_connection(("{host}", {port}), timeout=300 * {slow})
    c.sendall(wire.cancel_request({pid}, bytes.fromhex("{key}")))
    print(json.dumps(c.recv(10).hex()))
"""


@pytest.fixture(scope="module")
def pg(lab):
    server = Postgres(lab.b, port=PORT, settings={"log_line_prefix": "pid=%p "})
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def inst(lab, pg, echo_at, tmp_path_factory):
    echo_at(ELSEWHERE)
    policy = tmp_path_factory.mktemp("cancelpolicy") / "policy.yaml"
    policy.write_text(POLICY.format(addr=lab.b.addr4, port=PORT))
    i = Instance(lab.a, instance_name("cp"), proxy_port=16811, dns_port=16863, policy=str(policy), workers=2)
    try:
        i.start()
        assert len(i.status()["proxy_pids"]) == 2
        yield i
    finally:
        i.close()


def server_cancelled(pg: Postgres, marker: str) -> bool:
    """Server side: a backend reported the statement with `marker` cancelled at a client's request."""
    lines = pg.log.read_text(errors="replace").splitlines()
    return any(re.match(r"pid=\d+ ERROR:  canceling statement due to user request", line)
               and marker in (lines[n + 1] if n + 1 < len(lines) else "") for n, line in enumerate(lines))


class Session:
    """An agent's raw session running one long statement, in a thread; its key read from a file."""

    def __init__(self, inst: Instance, lab, agent: str, marker: str):
        self.share = Path(tempfile.mkdtemp(prefix="interlock-cp-"))
        os.chmod(self.share, 0o777)
        self.result: dict = {}
        self.marker = marker
        self.thread = threading.Thread(target=lambda: self.result.setdefault("out", agent_py(
            inst, SESSION, agent, host=lab.b.addr4, port=PORT, share=self.share, marker=marker)))
        self.thread.start()
        keyfile = self.share / "key.json"
        assert wait_until(lambda: keyfile.exists() and keyfile.read_text(), timeout=120), "no session"
        key = json.loads(keyfile.read_text())
        self.pid, self.key = key["pid"], key["key"]

    def running(self, pg: Postgres) -> bool:
        return pg.psql(f"select state from pg_stat_activity where pid = {self.pid}") == "active"

    def end(self, pg: Postgres) -> None:
        pg.psql(f"select pg_terminate_backend({self.pid})")
        self.thread.join(timeout=120 * SLOWDOWN)
        for p in self.share.iterdir():
            p.unlink()
        self.share.rmdir()


def cancel(inst: Instance, agent: str, host: str, port: int, s: Session):
    return agent_py(inst, SEND, agent, host=host, port=port, pid=s.pid, key=s.key)


def test_a_cancel_sent_elsewhere_does_not_reach_a_target_whose_rule_refuses_it(inst, lab, pg):
    s = Session(inst, lab, "bot", "elsewhere-target")
    try:
        assert wait_until(lambda: s.running(pg), timeout=60)
        # the rule is in force: bot's cancel sent to prod-db itself is denied
        assert cancel(inst, "bot", lab.b.addr4, PORT, s) == ""
        assert s.running(pg) and not server_cancelled(pg, s.marker)
        # the attack: the same key sent to another service bot may reach (no rule there)
        for _ in range(4):  # both workers get their turn at it
            assert cancel(inst, "bot", lab.b.addr4, ELSEWHERE, s) == ""
        assert s.running(pg), "server side: the statement on prod-db still runs"
        assert not server_cancelled(pg, s.marker)
        assert s.thread.is_alive()
        rows = [r for r in inst.sessions("bot") if r["dst_port"] == ELSEWHERE]
        assert len(rows) == 4 and all(r["outcome"] == "refused" and "another server" in (r["detail"] or "")
                                      for r in rows), rows
        denied = [r for r in inst.sessions("bot") if r["dst_port"] == PORT and r["outcome"] == "denied"]
        assert len(denied) == 1 and "no-cancels-on-prod" in denied[0]["detail"]
    finally:
        s.end(pg)
    # control: an agent no rule stops cancels its statement on prod-db, sent where its session is
    c = Session(inst, lab, "dave", "elsewhere-control")
    try:
        assert wait_until(lambda: c.running(pg), timeout=60)
        assert cancel(inst, "dave", lab.b.addr4, PORT, c) == ""
        c.thread.join(timeout=120 * SLOWDOWN)
        assert c.result["out"] == ["57014"], c.result
        assert wait_until(lambda: server_cancelled(pg, c.marker))
    finally:
        c.end(pg)


def pending(inst: Instance) -> list[dict]:
    return json.loads(inst.cli("approvals", "--json").stdout)


def test_a_cancel_the_policy_holds_waits_for_a_human(inst, lab, pg):
    s = Session(inst, lab, "carol", "held-cancel")
    try:
        assert wait_until(lambda: s.running(pg), timeout=60)
        result: dict = {}
        t = threading.Thread(target=lambda: result.setdefault("out", cancel(inst, "carol", lab.b.addr4, PORT, s)))
        t.start()
        held = wait_until(lambda: [h for h in pending(inst) if h["rule"] == "cancels-need-a-human"], timeout=60)
        assert held and held[0]["agent"] == "carol", "the cancel waits for a human"
        assert s.running(pg) and not server_cancelled(pg, s.marker), "server side: nothing cancelled while held"
        assert inst.cli("deny", held[0]["id"], "--reason", "let it finish").returncode == 0
        t.join(timeout=120 * SLOWDOWN)
        assert result["out"] == ""
        assert s.running(pg) and not server_cancelled(pg, s.marker), "server side: a denied cancel cancels nothing"
        assert s.thread.is_alive()
        # control: the same cancel, approved, ends the statement
        result.clear()
        t = threading.Thread(target=lambda: result.setdefault("out", cancel(inst, "carol", lab.b.addr4, PORT, s)))
        t.start()
        held = wait_until(lambda: [h for h in pending(inst) if h["rule"] == "cancels-need-a-human"], timeout=60)
        assert held and inst.cli("approve", held[0]["id"]).returncode == 0
        t.join(timeout=120 * SLOWDOWN)
        s.thread.join(timeout=120 * SLOWDOWN)
        assert s.result["out"] == ["57014"], s.result
        assert wait_until(lambda: server_cancelled(pg, s.marker))
        decisions = [e for e in inst.events("decision") if e["data"]["action"] == "cancel"
                     and e["data"]["rule"] == "cancels-need-a-human"]
        assert len(decisions) == 2 and all(e["data"]["verdict"] == "approve" for e in decisions)
    finally:
        s.end(pg)
