"""What proxy workers share (proxy/workers.py), each part checked with two workers' objects on
the same files, as two processes would hold them; the datapath suites run with the default
`workers:` (one per CPU) and cover the rest end to end."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from interceptor.config import ConfigError, load
from proxy import workers
from proxy.gate import NameBindings, PolicyHolder
from proxy.metrics import ProxyMetrics, _Merged
from recorder.store import Recorder, SessionRecord, new_session_id, read_sessions, worker_of


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    workers.reset(d, 2)
    yield d
    workers.remove(d)


def test_a_name_one_worker_bound_counts_on_the_other(run_dir):
    a, b = (NameBindings(shared=workers.SharedNames(workers.names_db(run_dir), workers.names_version_file(run_dir)))
            for _ in range(2))
    assert b.names("bot", "10.0.0.5") == ()
    a.bind("bot", "API.Example.test.", "10.0.0.5", 60)
    assert b.names("bot", "10.0.0.5") == ("api.example.test",)
    assert b.names("other", "10.0.0.5") == (), "bindings stay per agent"
    assert b.names("bot", "::ffff:10.0.0.5") == ("api.example.test",)
    # an expired binding counts nowhere
    a.bind("bot", "short.example.test", "10.0.0.6", 0)  # raised to MIN_TTL
    until = time.monotonic() + NameBindings.MIN_TTL
    b.clock = lambda: until + 1
    assert b.names("bot", "10.0.0.6") == ()


def test_the_connection_cap_counts_every_worker(run_dir):
    w0 = workers.SharedCounts(workers.counts_file(run_dir), 0, 2)
    w1 = workers.SharedCounts(workers.counts_file(run_dir), 1, 2)
    assert w0.admit(7, 3) and w1.admit(7, 3) and w1.admit(7, 3)
    assert not w0.admit(7, 3) and not w1.admit(7, 3), "three open over both workers: the cap"
    assert w0.admit(8, 3), "another agent's share is its own"
    w1.release(7)
    assert w0.admit(7, 3) and not w1.admit(7, 3)
    # worker 1 dies; its successor starts with an empty row (the kernel closed its connections)
    w1.close()
    successor = workers.SharedCounts(workers.counts_file(run_dir), 1, 2)
    assert successor.total(7) == 2 and successor.admit(7, 3)
    with pytest.raises(ValueError):
        workers.SharedCounts(workers.counts_file(run_dir), 2, 3)  # sized for two workers


def _two_workers_and_a_new_policy(run_dir, tmp_path):
    """Two workers' policy holders on one allow rule; the file then names a second (deny) rule."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - name: a\n    decision: allow\n")
    rec = Recorder(tmp_path / "r.db")
    a = PolicyHolder(str(policy), rec, generation=workers.SharedGeneration(workers.generation_file(run_dir)))
    b = PolicyHolder(str(policy), rec, generation=workers.SharedGeneration(workers.generation_file(run_dir)))
    policy.write_text("rules:\n  - name: a\n    decision: allow\n  - name: b\n    decision: deny\n")
    return policy, rec, a, b


def test_a_policy_one_worker_loads_is_every_workers_next(run_dir, tmp_path):
    policy, rec, a, b = _two_workers_and_a_new_policy(run_dir, tmp_path)
    assert a.reload()
    assert len(b.current.rules) == 2, "the sibling loads it before its next decision, not at its next watch"
    policy.write_text("rules:\n  - decision: perhaps\n")
    assert not a.reload()
    assert len(a.current.rules) == len(b.current.rules) == 2, "a rejected reload changes no worker"
    rec.close()


def test_a_sibling_follows_the_policy_its_sibling_validated_even_if_the_file_broke_since(run_dir, tmp_path):
    """The race make test met: A loads a deny policy, the file turns invalid before B's next decision;
    B reading the file again failed and stayed on the allow policy A had replaced."""
    policy, rec, a, b = _two_workers_and_a_new_policy(run_dir, tmp_path)
    assert a.reload()
    policy.write_text("rules:\n  - decision: perhaps\n")  # before b's next decision
    assert [r.name for r in b.current.rules] == ["a", "b"], "b judges by the policy a validated, not a stale one"
    rec.close()


def test_a_reload_of_a_file_that_is_not_utf8_is_rejected_and_every_worker_keeps_its_policy(run_dir, tmp_path):
    policy, rec, a, b = _two_workers_and_a_new_policy(run_dir, tmp_path)
    policy.write_bytes(b"rules:\n  - name: caf\xe9\n    decision: deny\n")
    assert not a.reload(), "rejected, not raised"
    assert [r.name for r in a.current.rules] == [r.name for r in b.current.rules] == ["a"]
    rejected = [json.loads(d) for (d,) in rec.conn.execute("SELECT data FROM events WHERE kind = 'policy-rejected'")]
    assert rejected and "not UTF-8 text" in rejected[-1]["problems"][0], rejected
    rec.close()


def test_a_restarted_worker_closes_out_only_its_own_sessions(tmp_path):
    loop = asyncio.new_event_loop()
    try:
        rec = Recorder(tmp_path / "c.db", loop)
        mine, theirs = (SessionRecord(id=new_session_id(w), agent="bot", pid=1, tgid=1, uid=1, gid=1, comm="x",
                                      exe="/x", cmdline="x", cgroup_id=1, dst_addr="10.0.0.1", dst_port=80,
                                      family="ipv4") for w in (1, 0))
        assert worker_of(mine.id) == 1 and worker_of(theirs.id) == 0
        for s in (mine, theirs):
            loop.run_until_complete(rec.session_open(s, wait=True))
        rec.close_out("proxy-died", "killed", worker=1)
        loop.run_until_complete(asyncio.sleep(0))
        rows = {r["id"]: r["outcome"] for r in read_sessions(tmp_path / "c.db")}
        assert rows == {mine.id: "proxy-died", theirs.id: "open"}
        rec.close()
    finally:
        loop.close()


def test_worker_zero_serves_every_workers_metrics(run_dir):
    zero, one = ProxyMetrics(), ProxyMetrics()
    for m in (zero, one):
        m.operation("bot", "tcp", "allow")
        m.policy_loaded(3)
        m.session_closed("bot", "tcp", "closed", 10, 0)
    one.dump(workers.metrics_file(run_dir, 1))
    merged = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for fam in _Merged(zero.registry, lambda: [workers.metrics_file(run_dir, 1)]).collect()
              for s in fam.samples}
    assert merged[("interlock_operations_total", (("agent", "bot"), ("decision", "allow"), ("protocol", "tcp")))] == 2
    assert merged[("interlock_bytes_total", (("agent", "bot"), ("direction", "up"), ("protocol", "tcp")))] == 20
    assert merged[("interlock_policy_generation", ())] == 1, "each worker loaded one policy: one generation"


def test_workers_setting(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workers: 3\n")
    assert load(cfg).workers == 3
    assert load(None).workers == min(len(os.sched_getaffinity(0)), 64)  # one per usable CPU
    for bad in ("0", "65", "two"):
        cfg.write_text(f"workers: {bad}\n")
        with pytest.raises(ConfigError, match="workers"):
            load(cfg)
