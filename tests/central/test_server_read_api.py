"""The fleet read API: hosts, sessions with filters, replay, approvals, export (checked with verify_chain)."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from central_kit import call

from recorder.records import from_json, public_key_from_hex, verify_chain


def _session(sid: str, agent: str, addr: str, port: int, verdict: str, started: float, outcome: str = "closed") -> str:
    return json.dumps({"id": sid, "agent": agent, "uid": 1000, "exe": "/usr/bin/x", "dst_addr": addr, "dst_port": port,
                       "protocol": "postgres", "started": started, "ended": started + 1, "bytes_up": 1, "bytes_down": 2,
                       "outcome": outcome, "verdict": verdict, "rule": "r"})


@pytest.fixture(scope="module")
def fleet(recorder, tmp_path_factory):
    """Two hosts with sessions of two agents to two targets, one approval each."""
    from central_kit import join

    tmp = tmp_path_factory.mktemp("fleet")
    a, b = join(recorder, tmp, "fleet-a"), join(recorder, tmp, "fleet-b")
    a.extend([("session-open", _session("a1", "bot", "10.0.0.5", 5432, "allow", 1_000_000.0, "open")),
              ("event", json.dumps({"id": 1, "at": 1_000_000.1, "kind": "statement", "session": "a1", "data": {"sql": "select 1"}})),
              ("session-close", _session("a1", "bot", "10.0.0.5", 5432, "allow", 1_000_000.0)),
              ("session-open", _session("a2", "etl", "10.0.0.6", 443, "deny", 2_000_000.0)),
              ("approval", json.dumps({"id": "ap-a", "created": 2_000_000.5, "session": "a2", "agent": "etl", "status": "pending"}))])
    b.extend([("session-open", _session("b1", "bot", "10.0.0.6", 443, "allow", 3_000_000.0)),
              ("approval", json.dumps({"id": "ap-b", "created": 3_000_000.5, "session": "b1", "agent": "bot", "status": "approved"}))])
    for h in (a, b):
        r = h.ingest(h.sent, [h.checkpoint(h.sent[-1])])
        assert r.status == 200, r.body
    return a, b, recorder.operator("reader")


def _get(recorder, op, path: str, **q):
    r = call(recorder, op, "GET", path + ("?" + urlencode(q) if q else ""))
    assert r.status == 200, r.body
    return r.json()


def test_sessions_filters(recorder, fleet):
    a, b, op = fleet
    mine = {a.host_id, b.host_id}

    def ids(**q):
        return sorted(s["id"] for s in _get(recorder, op, "/v1/sessions", **q)["sessions"] if s["host"] in mine)

    assert ids() == ["a1", "a2", "b1"]
    assert ids(host=a.host_id) == ["a1", "a2"] and ids(host="fleet-b") == ["b1"]
    assert ids(agent="bot") == ["a1", "b1"]
    assert ids(target="10.0.0.6") == ["a2", "b1"] and ids(target="10.0.0.5:5432") == ["a1"] and ids(target="10.0.0.5:443") == []
    assert ids(verdict="deny") == ["a2"]
    assert ids(since="1500000", until="2500000") == ["a2"]
    assert ids(since="1970-01-30T00:00:00Z") == ["b1"]  # 2_505_600
    assert ids(limit="1", host=b.host_id) == ["b1"]
    s = next(x for x in _get(recorder, op, "/v1/sessions", host=a.host_id)["sessions"] if x["id"] == "a1")
    assert s["host_name"] == "fleet-a" and s["outcome"] == "closed" and s["dst_port"] == 5432 and s["bytes_down"] == 2
    bad = call(recorder, op, "GET", "/v1/sessions?since=yesterday")
    assert bad.status == 400 and "ISO 8601" in bad.json()["error"]
    assert call(recorder, op, "GET", "/v1/sessions?limit=0").status == 400


def test_replay_and_approvals(recorder, fleet):
    a, b, op = fleet
    rep = _get(recorder, op, f"/v1/sessions/{a.host_id}/a1")
    assert rep["session"]["id"] == "a1" and [e["data"]["sql"] for e in rep["events"]] == ["select 1"]
    assert call(recorder, op, "GET", f"/v1/sessions/{a.host_id}/nope").status == 404
    appr = {x["id"]: x for x in _get(recorder, op, "/v1/approvals")["approvals"]}
    assert appr["ap-a"]["status"] == "pending" and appr["ap-a"]["host"] == a.host_id and appr["ap-b"]["host_name"] == "fleet-b"
    assert [x["id"] for x in _get(recorder, op, "/v1/approvals", status="pending")["approvals"] if x["id"].startswith("ap-")] == ["ap-a"]
    hosts = {h["host"]: h for h in _get(recorder, op, "/v1/hosts")["hosts"]}
    assert hosts[a.host_id]["head_seq"] == 5 and hosts[a.host_id]["signed_seq"] == 5 and hosts[b.host_id]["name"] == "fleet-b"


def test_export_verifies_and_names_an_edited_row(recorder, fleet):
    a, _, op = fleet
    r = call(recorder, op, "GET", f"/v1/export?host={a.host_id}")
    assert r.status == 200
    lines = [json.loads(x) for x in r.body.decode().splitlines()]
    assert lines[0] == {"type": "host", "host": a.host_id, "name": "fleet-a", "key": lines[0]["key"]}
    items = [from_json(x) for x in lines[1:]]
    recs = [i for i in items if i.__class__.__name__ == "Record"]
    cps = [i for i in items if i.__class__.__name__ == "Checkpoint"]
    assert [x.seq for x in recs] == [1, 2, 3, 4, 5] and [x.body for x in recs] == [x.body for x in a.sent]
    key = public_key_from_hex(lines[0]["key"])
    assert verify_chain(a.host_id, recs, cps, key) == []
    # someone with the database edits a body: the export now names that record
    recorder.psql(f"UPDATE records SET body = replace(body, 'select 1', 'select 2') WHERE host_id = '{a.host_id}' AND seq = 2")
    r = call(recorder, op, "GET", f"/v1/export?host={a.host_id}")
    items = [from_json(json.loads(x)) for x in r.body.decode().splitlines()[1:]]
    found = verify_chain(a.host_id, [i for i in items if i.__class__.__name__ == "Record"],
                         [i for i in items if i.__class__.__name__ == "Checkpoint"], key)
    assert found and (found[0].seq, found[0].problem) == (2, "changed")
