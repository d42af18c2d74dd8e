"""The handler's memory of its own judgements (PostgresHandler._plan), sans-IO: the real handler,
policy engine and recorder, with the relay's socket side replaced by lists. A statement text (or
its literal-blind shape) that was allowed and is on record is not judged again in the session;
a policy reload, a refusal, a hold or relations the session created always mean judging again."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from identity.agents import AgentIdentity
from policy import engine
from proxy.postgres import catalog, wire
from proxy.postgres.analysis import Analyzer
from proxy.postgres.handler import READY, PostgresHandler
from proxy.postgres.stream import TYPED
from proxy.postgres.tracker import REFUSAL_PARSE
from recorder.store import Recorder, SessionRecord, new_session_id

ADDR = "10.9.0.2"
ALLOW_READS = f"""\
targets:
  db: {{address: "{ADDR}", port: 5432, protocol: postgres}}
rules:
  - name: hold-destructive
    risk: [drop, truncate, delete-without-where]
    decision: approve
default: allow
"""
DENY_ACCOUNTS = ALLOW_READS.replace("rules:\n", "rules:\n  - name: no-accounts\n    object: [accounts]\n"
                                                "    decision: deny\n")
ROW = (wire.RowDescription((wire.FieldDescription("balance", 23),)).encode() + wire.DataRow((b"0",)).encode()
       + wire.CommandComplete("SELECT 1").encode() + wire.ready_for_query("I"))


class Session:
    """One handler in the statement phase, its bytes to either side, and what it asked the policy."""

    def __init__(self, tmp: Path, policy_text: str):
        self.loop = asyncio.new_event_loop()
        self.db = tmp / "recorder.db"
        self.recorder = Recorder(self.db, self.loop)
        self.policy = engine.load("p.yaml", policy_text)
        self.rec = SessionRecord(new_session_id(), "bot", 1, 1, 0, 0, "psql", "/usr/bin/psql", "psql", 1, ADDR, 5432,
                                 "ipv4", "postgres")
        self.recorder.session_open(self.rec)
        self.judged: list[str] = []
        self.up: list[bytes] = []
        self.down: list[bytes] = []
        session = self

        class Proxy:
            recorder, loop = self.recorder, self.loop

            @property
            def policy(self):
                return type("Holder", (), {"current": session.policy})

        class Conn:
            proxy, rec, upstream = Proxy(), self.rec, True

            def names(self):
                return ()

            def judge(self, op):
                session.judged.append(op.summary)
                d = session.policy.decide(session.rec.agent, engine.Destination(ADDR, 5432, (), "postgres"), op)
                return d, session.recorder.decision(session.rec.id, op, d)

            def to_server(self, data):
                session.up.append(bytes(data))

            def to_client(self, data):
                session.down.append(bytes(data))

            def pause_client(self):
                pass

            def resume_client(self):
                pass

            def spawn(self, coro):
                return session.loop.create_task(coro)

        self.h = PostgresHandler(Conn(), {})
        self.h.start()
        self.h.phase, self.h.cs.mode = READY, TYPED
        self.h.analyzer, self.h.catalog = Analyzer(), catalog.FunctionCatalog()

    def settle(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0.05))  # group commits, statement records

    def query(self, sql: str) -> bytes:
        """Send a Query, answer it as the server would once it got there; the bytes sent upstream."""
        self.up.clear()
        self.h.on_client(wire.Query(sql).encode())
        self.settle()
        sent = b"".join(self.up)
        if sent.startswith(b"Q"):
            self.h.on_server(ROW)
        elif sent.startswith(REFUSAL_PARSE):  # the stand-in fails in the server's parser
            self.h.on_server(wire.error_response("ERROR", "42601", "syntax error") + wire.ready_for_query("I"))
        self.settle()
        return sent

    def close(self) -> None:
        self.recorder.close()
        self.loop.close()


@pytest.fixture
def session(tmp_path):
    s = Session(tmp_path, ALLOW_READS)
    yield s
    s.close()


def events(s: Session, kind: str) -> list[str]:
    with sqlite3.connect(s.db) as db:
        return [r[0] for r in db.execute("SELECT data FROM events WHERE kind = ? ORDER BY id", (kind,))]


def test_an_allowed_statement_shape_is_judged_once_and_every_run_recorded(session):
    for aid in (1, 2, 3, 4):
        assert session.query(f"SELECT balance FROM accounts WHERE id = {aid}").startswith(b"Q")
    # judged while its decision was not yet on record, then answered from the session's memory
    assert len(session.judged) <= 2 and session.h.plans
    assert len(events(session, "statement")) == 4
    assert all("WHERE id = " in e for e in events(session, "statement"))


def test_a_policy_reload_is_judged_again_and_refused(session):
    for aid in (1, 2, 3):
        session.query(f"SELECT balance FROM accounts WHERE id = {aid}")
    session.policy = engine.load("p.yaml", DENY_ACCOUNTS)  # what a reload does: a new Policy object
    sent = session.query("SELECT balance FROM accounts WHERE id = 9")
    assert sent.startswith(REFUSAL_PARSE) and b"accounts" not in sent
    assert any('"verdict": "deny"' in e and "no-accounts" in e for e in events(session, "decision"))
    assert b"refused by rule 'no-accounts'" in b"".join(session.down)


def test_refusals_and_holds_are_never_remembered(session):
    session.policy = engine.load("p.yaml", DENY_ACCOUNTS)
    for aid in (1, 2, 3):
        assert session.query(f"SELECT balance FROM accounts WHERE id = {aid}").startswith(REFUSAL_PARSE)
    assert len(session.judged) == 3 and not session.h.plans
    assert len([e for e in events(session, "decision") if '"deny"' in e]) == 3


def test_relations_the_session_created_mean_judging_again(session):
    for aid in (1, 2):
        session.query(f"SELECT balance FROM accounts WHERE id = {aid}")
    session.h.owned.add("public.accounts")  # as after a committed CREATE TABLE accounts
    before = len(session.judged)
    session.h.known.clear()
    session.query("SELECT balance FROM accounts WHERE id = 3")
    assert len(session.judged) == before + 1


def test_an_identity_token_that_expires_mid_session_refuses_a_remembered_statement(session):
    """decide() refuses everything once the agent's bound identity expired: the session's memory
    must not outlive it."""
    ident = AgentIdentity("bot", iss="https://issuer.test", sub="repo:x", exp=time.time() + 3600)
    session.policy.identity_of = {"bot": ident}.get
    for aid in (1, 2, 3):
        assert session.query(f"SELECT balance FROM accounts WHERE id = {aid}").startswith(b"Q")
    assert session.h.plans
    ident.exp = time.time() - 1
    assert session.query("SELECT balance FROM accounts WHERE id = 4").startswith(REFUSAL_PARSE)
    assert any('"rule": "identity"' in e for e in events(session, "decision"))


def test_a_proxy_statement_log_goes_with_its_proxy():
    """The statement log was keyed by id(proxy): a proxy created after another was freed could
    get the old one's log, with its closed loop (a full run failed on it). Keyed by the proxy."""
    import gc

    from proxy.postgres import handler

    class Proxy:
        recorder, loop = object(), object()

    first = Proxy()
    log = handler._statement_log(first)
    assert handler._statement_log(first) is log  # control: one per proxy
    del first
    gc.collect()
    assert log not in handler._statement_logs.values()
    assert handler._statement_log(Proxy()) is not log
