"""Bad input at the command line: one clear line that says what to do, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "interceptor.cli"]


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, **kw)


@pytest.fixture
def sd(tmp_path):
    return str(tmp_path / "state")


def no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr


def test_run_without_a_daemon_says_how_to_start_one(sd):
    r = run("run", "--state-dir", sd, "--", "true")
    no_traceback(r)
    assert r.returncode == 2 and "Start it first: interlock daemon --state-dir" in r.stderr


def test_run_without_a_command(sd):
    r = run("run", "--state-dir", sd)
    no_traceback(r)
    assert r.returncode == 2 and "nothing to run" in r.stderr


@pytest.mark.parametrize("text, message", [
    ("proxy_port: 99999\n", "'proxy_port' must be a port number"),
    ("bogus: 1\n", "unknown key 'bogus'"),
    ("agents: [{name: Bad Name}]\n", "needs a 'name'"),
    ("agents: [{name: a, exe: [relative/path]}]\n", "must be an absolute path"),
    ("cgroup_root: a/b\ncapture_cgroup: c\n", "must contain 'cgroup_root'"),
    ("proxy_port: [1\n", "not valid YAML"),
    ("operator_group: [wheel]\n", "'operator_group' must be a group name or a gid"),
    ("operator_group: no-such-group-h9\n", "operator_group 'no-such-group-h9': no such group"),
])
def test_bad_config_is_refused_with_the_key_named(tmp_path, sd, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    r = run("daemon", "--state-dir", sd, "--config", str(cfg))
    no_traceback(r)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_enrolment_verbs_name_a_missing_process_before_asking(sd):
    for verb in ("enroll", "unenroll"):
        r = run(verb, "--state-dir", sd, "--pid", "0")
        no_traceback(r)
        assert r.returncode == 2 and "no process 0" in r.stderr, r.stderr


def test_run_user_needs_root(sd):
    r = subprocess.run(["setpriv", "--reuid", "65533", "--regid", "65533", "--clear-groups", *CLI, "run",
                        "--state-dir", sd, "--user", "0", "--", "true"], capture_output=True, text=True, timeout=60)
    no_traceback(r)
    assert r.returncode == 2 and "--user needs root" in r.stderr, r.stderr


def test_missing_config_file(sd):
    r = run("daemon", "--state-dir", sd, "--config", "/nonexistent/c.yaml")
    no_traceback(r)
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_approval_verbs_with_unknown_ids_and_bad_durations(sd):
    r = run("approve", "--state-dir", sd, "deadbeef")
    no_traceback(r)
    assert r.returncode == 2 and "no approval deadbeef" in r.stderr
    r = run("approve", "--state-dir", sd, "deadbeef", "--for", "a while")
    no_traceback(r)
    assert r.returncode == 2 and "not a duration" in r.stderr
    r = run("deny", "--state-dir", sd, "deadbeef", "--reason", "no")
    assert r.returncode == 2 and "no approval" in r.stderr


def test_reading_verbs_on_an_empty_state_dir(sd):
    assert "no sessions recorded yet" in run("sessions", "--state-dir", sd).stdout
    assert "no approvals pending" in run("approvals", "--state-dir", sd).stdout
    r = run("replay", "--state-dir", sd, "nope")
    no_traceback(r)
    assert r.returncode == 2 and "no session 'nope'" in r.stderr
    r = run("status", "--state-dir", sd)
    no_traceback(r)
    assert r.returncode == 3 and "daemon not running" in r.stdout


def test_explain_with_a_malformed_target(sd):
    r = run("policy", "explain", "--agent", "a", "--target", "nonsense", "--op", "connect")
    no_traceback(r)
    assert r.returncode == 2 and "ADDRESS:PORT" in r.stderr


def _recorded_sessions(sd: str, n: int) -> list[str]:
    from recorder.store import Recorder, SessionRecord, new_session_id

    rec = Recorder(Path(sd) / "recorder.db")
    ids = []
    for i in range(n):
        s = SessionRecord(id=new_session_id(), agent="bot", pid=100 + i, tgid=100 + i, uid=1000, gid=1000, comm="curl",
                          exe="/usr/bin/curl", cmdline="curl x", cgroup_id=1, dst_addr="10.0.0.2", dst_port=80, family="ipv4")
        rec.session_open(s)
        ids.append(s.id)
    rec.close()
    return ids


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("interlock ")


def test_sessions_lists_the_id_replay_needs(sd):
    ids = _recorded_sessions(sd, 2)
    out = run("sessions", "--state-dir", sd).stdout
    assert out.splitlines()[0].startswith("session")
    assert all(i in out for i in ids)
    assert run("replay", "--state-dir", sd, ids[0]).returncode == 0


@pytest.mark.parametrize("argv", [
    ["doctor"], ["policy", "check", "/nonexistent.yaml"], ["policy", "explain", "--agent", "a", "--target", "1.2.3.4:5",
                                                            "--op", "connect"],
    ["approvals"], ["approve", "deadbeef"], ["deny", "deadbeef", "--reason", "no"], ["sessions"], ["status"],
    ["replay", "nope"], ["rearm"], ["enroll", "--pid", "999999999"], ["run", "--", "true"],
])
def test_every_verb_takes_json_and_answers_in_json(sd, argv):
    """Success or failure, --json puts one JSON document on stdout (a failure also says why on stderr)."""
    verb, rest = argv[0], argv[1:]
    args = [verb, *rest[:1], "--state-dir", sd, *rest[1:], "--json"] if verb == "policy" else \
        [verb, "--state-dir", sd, "--json", *rest]
    r = run(*args)
    no_traceback(r)
    json.loads(r.stdout)


def test_a_closed_pipe_is_not_an_error_message(sd):
    _recorded_sessions(sd, 3000)
    p = subprocess.run(f"{' '.join(CLI)} sessions --state-dir {sd} --json --limit 3000 | head -c 10",
                       shell=True, capture_output=True, text=True, timeout=60)
    assert "Broken pipe" not in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_events_verb_lists_and_filters(sd):
    from recorder.store import Recorder

    rec = Recorder(Path(sd) / "recorder.db")
    rec.event("policy-rejected", {"file": "p.yaml", "problems": ["line 3: bad \x1b[2J"]})
    rec.event("tamper", {"what": "nft"})
    rec.close()
    out = run("events", "--state-dir", sd).stdout
    assert "policy-rejected" in out and "tamper" in out and "\x1b" not in out
    rows = json.loads(run("events", "--state-dir", sd, "--kind", "tamper", "--json").stdout)
    assert [r["kind"] for r in rows] == ["tamper"]


def test_prune_deletes_only_what_ended_before_the_cutoff(sd):
    import sqlite3
    import time

    from recorder.store import Recorder, SessionRecord, new_session_id

    rec = Recorder(Path(sd) / "recorder.db")
    old = SessionRecord(id=new_session_id(), agent="bot", pid=1, tgid=1, uid=0, gid=0, comm="c", exe="/c", cmdline="c",
                        cgroup_id=1, dst_addr="10.0.0.2", dst_port=80, family="ipv4", started=time.time() - 90000,
                        ended=time.time() - 90000, outcome="closed")
    still_open = SessionRecord(id=new_session_id(), agent="bot", pid=2, tgid=2, uid=0, gid=0, comm="c", exe="/c",
                               cmdline="c", cgroup_id=1, dst_addr="10.0.0.2", dst_port=80, family="ipv4",
                               started=time.time() - 90000)
    fresh = SessionRecord(id=new_session_id(), agent="bot", pid=3, tgid=3, uid=0, gid=0, comm="c", exe="/c", cmdline="c",
                          cgroup_id=1, dst_addr="10.0.0.2", dst_port=80, family="ipv4", ended=time.time(), outcome="closed")
    for s in (old, still_open, fresh):
        rec.session_open(s)
    rec.close()
    r = run("prune", "--state-dir", sd, "--older-than", "1d", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["deleted"]["sessions"] == 1
    left = {row[0] for row in sqlite3.connect(Path(sd) / "recorder.db").execute("SELECT id FROM sessions")}
    assert left == {still_open.id, fresh.id}
    assert run("prune", "--state-dir", sd, "--older-than", "soon").returncode == 2
