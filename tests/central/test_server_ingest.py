"""Ingest: idempotence, gaps, forks, checkpoints, and refusal of bad batches — each with its status,
its refusal row, its finding where the chain broke, and what is (not) stored, read in PostgreSQL."""

from __future__ import annotations

import json
import threading

from central_kit import Client, call, last_refusal_id, refusals

from recorder.records import Ed25519PrivateKey, Record, to_json


def count(rec, host_id: str) -> int:
    return int(rec.psql(f"SELECT count(*) FROM records WHERE host_id = '{host_id}'"))


def findings(rec, host_id: str) -> list[tuple[int, str]]:
    out = rec.psql(f"SELECT seq, problem FROM findings WHERE host_id = '{host_id}' ORDER BY id")
    return [(int(s), p) for s, p in (line.split("|") for line in out.splitlines() if line)]


def test_a_batch_sent_twice_is_stored_once(recorder, joined):
    h = joined()
    batch = h.records(500)
    cp = h.checkpoint(batch[-1])
    first = h.ingest(batch, [cp])
    again = h.ingest(batch, [cp])
    assert first.status == 200 and first.json() == {"acked": 500, "stored": 500, "duplicates": 0}
    assert again.status == 200 and again.json() == {"acked": 500, "stored": 0, "duplicates": 500}
    assert count(recorder, h.host_id) == 500
    assert recorder.psql(f"SELECT count(*) FROM checkpoints WHERE host_id = '{h.host_id}'") == "1"
    # an overlapping resend (the shipper died before the ack): the old part is duplicates, the rest stored
    more = h.records(10)
    r = h.ingest(batch[-5:] + more)
    assert r.json() == {"acked": 510, "stored": 10, "duplicates": 5}
    head = h.get("/v1/head").json()
    assert head == {"seq": 510, "hash": more[-1].hash, "signed_seq": 500}
    # bodies are stored verbatim
    body = recorder.psql(f"SELECT body FROM records WHERE host_id = '{h.host_id}' AND seq = 7")
    assert body == batch[6].body


def test_concurrent_resends_through_two_instances_store_each_record_once(recorder, joined):
    """Six senders race the same batches through the recorder's two worker processes: the chain-head
    lock serialises them, so every record is stored exactly once and nothing is refused as a fork."""
    h = joined("racer")
    batches = [h.records(200) for _ in range(5)]
    replies: list[int] = []

    def send():
        for b in batches:
            replies.append(h.ingest(b).status)

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert replies == [200] * 30  # each sender's batch k+1 follows its own k: no gap, and never a fork
    assert count(recorder, h.host_id) == 1000
    assert recorder.psql(f"SELECT count(DISTINCT seq), min(seq), max(seq) FROM records WHERE host_id = '{h.host_id}'") == "1000|1|1000"
    assert findings(recorder, h.host_id) == []
    assert int(recorder.psql(f"SELECT sum(x) FROM (SELECT count(*) x FROM records WHERE host_id = '{h.host_id}' GROUP BY seq) t")) == 1000


def test_a_gap_is_refused_with_the_expected_seq(recorder, joined):
    h = joined()
    assert h.ingest(h.records(10)).status == 200
    h.records(5)  # never sent
    mark = last_refusal_id(recorder)
    r = h.ingest(h.records(5))
    assert r.status == 409 and r.json()["expected"] == 11 and "gap" in r.json()["error"]
    assert count(recorder, h.host_id) == 10
    assert findings(recorder, h.host_id) == [(11, "gap")]
    assert [(s, host) for s, host, _ in refusals(recorder, mark)] == [(409, h.host_id)]
    # the host resumes from the head it is told, and the gap fills
    r = h.ingest(h.sent[10:])
    assert r.status == 200 and r.json()["acked"] == 20


def test_a_fork_is_flagged_and_refused(recorder, joined):
    h = joined()
    batch = h.records(20)
    assert h.ingest(batch).status == 200
    # the host "rewrites" seq 15 onwards: a different record at a stored seq
    prev = bytes.fromhex(batch[13].hash)
    from recorder.records import chain
    forked = list(chain(h.host_id, 15, prev, [("event", json.dumps({"id": 15, "rewritten": True}))]))
    mark = last_refusal_id(recorder)
    r = h.ingest(forked)
    assert r.status == 409 and "fork at seq 15" in r.json()["error"] and r.json()["expected"] == 21
    assert findings(recorder, h.host_id) == [(15, "fork")]
    assert [s for s, _, _ in refusals(recorder, mark)] == [409]
    assert recorder.psql(f"SELECT hash FROM records WHERE host_id = '{h.host_id}' AND seq = 15") == "\\x" + batch[14].hash


def test_a_first_record_that_does_not_link_to_the_stored_head_is_refused(recorder, joined):
    h = joined()
    assert h.ingest(h.records(5)).status == 200
    from recorder.records import chain
    stray = list(chain(h.host_id, 6, b"\x01" * 32, [("event", "{}")]))
    r = h.ingest(stray)
    assert r.status == 409 and r.json()["expected"] == 6 and "does not link" in r.json()["error"]
    assert findings(recorder, h.host_id) == [(6, "unlinked")]
    assert count(recorder, h.host_id) == 5


def test_a_bad_checkpoint_refuses_the_batch(recorder, joined):
    h = joined()
    batch = h.records(10)
    forged = h.checkpoint(batch[-1], key=Ed25519PrivateKey.generate())  # not the host's registered key
    mark = last_refusal_id(recorder)
    r = h.ingest(batch, [forged])
    assert r.status == 409 and "signature does not verify" in r.json()["error"]
    assert count(recorder, h.host_id) == 0
    assert findings(recorder, h.host_id) == [(10, "bad-checkpoint")]
    # a valid signature over a head that is not the stored one
    from recorder.records import sign_checkpoint
    wrong_head = sign_checkpoint(h.signing, h.host_id, 10, b"\x02" * 32, 1)
    r = h.ingest(batch, [wrong_head])
    assert r.status == 409 and "not the stored" in r.json()["error"]
    assert [s for s, _, _ in refusals(recorder, mark)] == [409, 409]
    # control: the same batch with a good checkpoint is stored
    r = h.ingest(batch, [h.checkpoint(batch[-1])])
    assert r.status == 200 and r.json()["stored"] == 10
    assert h.get("/v1/head").json()["signed_seq"] == 10


def test_a_host_cannot_write_under_another_hosts_id(recorder, joined):
    victim, mallory = joined("victim"), joined("mallory")
    assert victim.ingest(victim.records(3)).status == 200
    mark = last_refusal_id(recorder)
    # mallory's certificate, the victim's id in the batch
    forged_recs = victim.records(3)
    r1 = mallory.ingest(forged_recs, host=victim.host_id)
    # mallory's id in the batch, the victim's records inside it
    r2 = mallory.ingest(forged_recs)
    assert (r1.status, r2.status) == (403, 403)
    assert "certificate of host" in r1.json()["error"] and "only its own records" in r2.json()["error"]
    assert [(s, host) for s, host, _ in refusals(recorder, mark)] == [(403, mallory.host_id)] * 2
    assert count(recorder, victim.host_id) == 3 and count(recorder, mallory.host_id) == 0


def test_malformed_batches_are_refused_with_what_is_wrong(recorder, joined):
    h = joined()
    good = h.records(3)
    j = [to_json(r) for r in good]
    cases = [
        (b"not json", "not JSON"),
        (json.dumps([1, 2]).encode(), "JSON object"),
        (json.dumps({"records": j}).encode(), '"host"'),
        (json.dumps({"host": h.host_id, "records": {"a": 1}}).encode(), "must be lists"),
        (json.dumps({"host": h.host_id, "records": [{**j[0], "kind": "bogus"}]}).encode(), "records[0]"),
        (json.dumps({"host": h.host_id, "records": [{**j[0], "seq": -1}]}).encode(), "records[0]"),
        (json.dumps({"host": h.host_id, "records": [j[0], j[2]]}).encode(), "contiguous"),
        (json.dumps({"host": h.host_id, "records": [j[0], {**j[1], "body": j[1]["body"] + " "}]}).encode(), "does not link to seq 1"),
        (json.dumps({"host": h.host_id, "records": [], "checkpoints": [{"type": "checkpoint", "host": h.host_id}]}).encode(), "checkpoints[0]"),
        (json.dumps({"host": h.host_id, "records": [{**j[0], "body": "\ud800"}]}).encode(), "not valid Unicode"),
        (json.dumps({"host": h.host_id, "records": [{**j[0], "hash": "zz" * 32}]}).encode(), "hash"),
    ]
    mark = last_refusal_id(recorder)
    for raw, words in cases:
        r = call(recorder, h.client, "POST", "/v1/ingest", raw)
        assert r.status == 400 and words in r.json()["error"], (raw[:80], r.body)
    assert [s for s, _, _ in refusals(recorder, mark)] == [400] * len(cases)
    assert count(recorder, h.host_id) == 0
    assert h.ingest(good).status == 200  # control


def test_oversized_batches_are_refused(recorder, joined):
    h = joined()
    mark = last_refusal_id(recorder)
    big = h.records(1, session="s" * 100)
    r = call(recorder, h.client, "POST", "/v1/ingest", b" " * (8 * 1024 * 1024 + 1))
    assert r.status == 413
    too_many = [to_json(Record(h.host_id, i + 1, "event", "{}", "00" * 32)) for i in range(10_001)]
    r2 = call(recorder, h.client, "POST", "/v1/ingest", {"host": h.host_id, "records": too_many})
    assert r2.status == 413 and "at most 10000" in r2.json()["error"]
    assert [s for s, _, _ in refusals(recorder, mark)] == [413, 413]
    assert h.ingest(big).status == 200  # control


def test_derived_sessions_follow_the_latest_record(recorder, joined):
    h = joined()
    open_ = {"id": "sess-a", "agent": "bot", "uid": 1000, "exe": "/usr/bin/psql", "dst_addr": "10.0.0.5", "dst_port": 5432,
             "protocol": "postgres", "started": 1000.5, "ended": None, "bytes_up": 0, "bytes_down": 0, "outcome": "open",
             "verdict": "allow", "rule": "r1"}
    close = {**open_, "ended": 1001.5, "bytes_up": 10, "bytes_down": 20, "outcome": "closed"}
    recs = h.extend([("session-open", json.dumps(open_)),
                     ("event", json.dumps({"id": 1, "at": 1000.6, "kind": "statement", "session": "sess-a", "data": {"sql": "select 1"}}))])
    assert h.ingest(recs).status == 200
    assert recorder.psql(f"SELECT outcome, bytes_up FROM sessions WHERE host_id = '{h.host_id}' AND id = 'sess-a'") == "open|0"
    more = h.extend([("session-close", json.dumps(close)), ("approval", json.dumps({"id": "ap1", "session": "sess-a", "status": "pending"})),
                     ("approval", json.dumps({"id": "ap1", "session": "sess-a", "status": "approved", "decided_by": "alice"}))])
    assert h.ingest(more).status == 200
    assert recorder.psql(f"SELECT outcome, bytes_up, bytes_down, last_seq FROM sessions WHERE host_id = '{h.host_id}'") == "closed|10|20|3"
    assert recorder.psql(f"SELECT status, decided_by FROM approvals WHERE host_id = '{h.host_id}'") == "approved|alice"
    assert recorder.psql(f"SELECT seq FROM records WHERE host_id = '{h.host_id}' AND session = 'sess-a' ORDER BY seq") == "1\n2\n3\n4\n5"


def test_unknown_paths_are_refused_and_recorded(recorder):
    anon = Client(recorder.url, recorder.ca_pem)
    mark = last_refusal_id(recorder)
    assert call(recorder, anon, "GET", "/v1/nothing").status == 404
    assert call(recorder, anon, "GET", "/v1/ingest").status == 405
    assert [s for s, _, _ in refusals(recorder, mark)] == [404, 405]


def test_bodies_are_stored_byte_for_byte(recorder, joined):
    """Whitespace, escapes and non-ASCII in a body survive the COPY exactly (the hash covers them)."""
    import psycopg

    h = joined()
    bodies = ['{"id":1,"at":1.0,"kind":"x","session":"s","data":{"sql":"select \'a\\tb\\\\n\'"}}',
              '{\n\t"id": 2,\r\n "session": "s\\"q", "data": "\\u00e9 é ✓ \\\\"\n}',
              '{"id":3,"at":2,"kind":"k","session":null,"data":"back\\\\slash\\\\\\\\"}', "[1, 2]", "not json at all \\N"]
    recs = h.extend([("event", b) for b in bodies])
    assert h.ingest(recs).status == 200
    with psycopg.connect(recorder.dsn) as conn:
        got = conn.execute("SELECT body, hash, session FROM records WHERE host_id = %s ORDER BY seq", (h.host_id,)).fetchall()
    assert [g[0] for g in got] == bodies
    assert [bytes(g[1]).hex() for g in got] == [r.hash for r in recs]
    assert [g[2] for g in got] == ["s", 's"q', None, None, None]


def test_the_ingest_hasher_is_record_hash():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from central.ingest import _Hasher
    from recorder.records import RECORD_KINDS, record_hash

    @settings(max_examples=300, deadline=None)
    @given(st.text(min_size=1, max_size=30), st.binary(min_size=32, max_size=32), st.integers(0, (1 << 63) - 1),
           st.sampled_from(RECORD_KINDS), st.text(max_size=300))
    def same(host, prev, seq, kind, body):
        assert _Hasher(host).hash(prev, seq, kind, body) == record_hash(prev, host, seq, kind, body)

    same()
