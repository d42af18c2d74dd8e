"""`interlock verify --export`: an export file checked host by host, the first break named with its kind and session.

Real CLI runs (python -m interceptor.cli) over export files written the way the recorder writes
them: records built with recorder.records, checkpoints signed with the host's Ed25519 key."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from recorder import records as R
from recorder.verify import ExportError, parse_export, verify_host

REPO = Path(__file__).resolve().parent.parent


def bodies(host: str, sessions: int = 3) -> list[tuple[str, str]]:
    """(kind, body) as a host's journal writes them: session-open, a decision event, session-close."""
    out = []
    for i in range(sessions):
        sid = f"6{i:04x}{host[-1]}aa{i:08x}"
        row = {"id": sid, "agent": "bot", "pid": 4000 + i, "tgid": 4000 + i, "uid": 65533, "gid": 65533, "comm": "curl",
               "exe": "/usr/bin/curl", "cmdline": "curl http://10.0.0.2/", "cgroup_id": 77, "dst_addr": "10.0.0.2",
               "dst_port": 80, "family": "ipv4", "protocol": "http", "started": 1764500000.5 + i, "ended": None,
               "bytes_up": 0, "bytes_down": 0, "outcome": "open", "detail": None, "verdict": "allow", "rule": "web-ok"}
        out.append(("session-open", json.dumps(row, separators=(",", ":"))))
        ev = {"id": 10 + i, "at": 1764500000.6 + i, "kind": "decision", "session": sid,
              "data": {"verdict": "allow", "protocol": "http", "action": "GET", "summary": "GET /", "rule": "web-ok"}}
        out.append(("event", json.dumps(ev, separators=(",", ":"))))
        out.append(("session-close", json.dumps({**row, "ended": 1764500001.0 + i, "outcome": "closed",
                                                 "bytes_up": 80, "bytes_down": 512}, separators=(",", ":"))))
    return out


class Host:
    def __init__(self, host: str, name: str, sessions: int = 3):
        self.host, self.name = host, name
        self.key = Ed25519PrivateKey.generate()
        self.records = list(R.chain(host, 1, R.GENESIS, bodies(host, sessions)))
        # a checkpoint every 4 records and one over the head, as the chainer signs them
        self.checkpoints = [self.sign(r) for r in self.records if r.seq % 4 == 0 or r.seq == len(self.records)]

    def sign(self, r: R.Record, key: Ed25519PrivateKey | None = None) -> R.Checkpoint:
        return R.sign_checkpoint(key or self.key, self.host, r.seq, bytes.fromhex(r.hash), 1_764_500_000_000_000 + r.seq)

    @property
    def key_hex(self) -> str:
        return R.public_key_hex(self.key)

    def lines(self, records=None, checkpoints=None, key_hex=None) -> list[str]:
        head = {"type": "host", "host": self.host, "name": self.name, "key": key_hex or self.key_hex}
        items = sorted([*(records if records is not None else self.records), *(checkpoints if checkpoints is not None else self.checkpoints)],
                       key=lambda x: (x.seq, isinstance(x, R.Checkpoint)))
        return [json.dumps(head)] + [json.dumps(R.to_json(i)) for i in items]


def write(path: Path, *sections: list[str]) -> Path:
    path.write_text("".join(line + "\n" for s in sections for line in s))
    return path


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "interceptor.cli", "verify", *args], capture_output=True, text=True,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=60)


@pytest.fixture
def hosts():
    return Host("h-0001", "alpha"), Host("h-0002", "beta")


def test_intact_export_passes(tmp_path, hosts):
    a, b = hosts
    r = verify("--export", str(write(tmp_path / "x.jsonl", a.lines(), b.lines())))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK       host alpha (h-0001): 9 record(s), seqs 1..9, signed to seq 9" in r.stdout
    assert "OK       host beta (h-0002)" in r.stdout and "verify: 2 of 2 host(s) intact" in r.stdout


def test_body_edited_by_hand_names_that_record(tmp_path, hosts):
    a, b = hosts
    f = write(tmp_path / "x.jsonl", a.lines(), b.lines())
    text = f.read_text()
    # the operator's edit: one event's verdict rewritten inside its body, nothing else touched
    target = b.records[4]  # seq 5: the event of session 1
    assert target.kind == "event"
    edited = target.body.replace('"verdict":"allow"', '"verdict":"deny"')
    line = json.dumps(R.to_json(target))
    assert text.count(line) == 1
    f.write_text(text.replace(line, json.dumps(R.to_json(replace(target, body=edited)))))
    r = verify("--export", str(f), "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    by_host = {h["host"]: h for h in doc["hosts"]}
    assert by_host["h-0001"]["ok"] is True
    first = by_host["h-0002"]["problems"][0]
    assert (first["problem"], first["seq"], first["kind"], first["session"]) == ("changed", 5, "event", b.records[3].data()["id"])
    r = verify("--export", str(f))
    assert r.returncode == 1
    assert f"FAIL     host beta (h-0002): CHANGED seq 5 (event, session {b.records[3].data()['id']})" in r.stdout


def test_removed_line_is_named(tmp_path, hosts):
    a, _ = hosts
    lines = a.lines()
    gone = json.dumps(R.to_json(a.records[1]))
    r = verify("--export", str(write(tmp_path / "x.jsonl", [x for x in lines if x != gone])))
    assert r.returncode == 1 and "REMOVED seq 2: seq 2 missing before seq 3" in r.stdout, r.stdout


def test_records_cut_from_the_end_are_named_by_the_signed_head(tmp_path, hosts):
    a, _ = hosts
    r = verify("--export", str(write(tmp_path / "x.jsonl", a.lines(records=a.records[:6]))), "--json")
    first = json.loads(r.stdout)["hosts"][0]["problems"][0]
    assert r.returncode == 1 and (first["problem"], first["seq"]) == ("removed", 7), first


def test_forged_rewritten_chain_fails_the_checkpoints(tmp_path, hosts):
    a, _ = hosts
    # whoever holds the store rewrites seq 2 and re-hashes everything after it: every link holds
    items = [(r.kind, r.body.replace('"verdict":"allow"', '"verdict":"deny"') if r.seq == 2 else r.body) for r in a.records]
    forged = list(R.chain(a.host, 1, R.GENESIS, items))
    r = verify("--export", str(write(tmp_path / "x.jsonl", a.lines(records=forged))))
    assert r.returncode == 1 and "BAD CHECKPOINT seq 4 (session-open" in r.stdout, r.stdout
    # ... and re-signing with a key of their own is caught once the verifier pins the host's key
    mallory = Ed25519PrivateKey.generate()
    cps = [a.sign(x, mallory) for x in forged if x.seq % 4 == 0 or x.seq == len(forged)]
    f = write(tmp_path / "y.jsonl", a.lines(records=forged, checkpoints=cps, key_hex=R.public_key_hex(mallory)))
    assert verify("--export", str(f)).returncode == 0  # unpinned, the export's own key vouches for it
    r = verify("--export", str(f), "--host-key", f"alpha={a.key_hex}")
    assert r.returncode == 1 and "KEY MISMATCH the host's key" in r.stdout and "BAD CHECKPOINT seq 4" in r.stdout, r.stdout


def test_inserted_record_is_named(tmp_path, hosts):
    a, _ = hosts
    fake = next(R.chain(a.host, 3, bytes.fromhex(a.records[1].hash), [("event", '{"id":1,"kind":"decision","session":"x"}')]))
    tail = [replace(r, seq=r.seq + 1) for r in a.records[2:]]
    r = verify("--export", str(write(tmp_path / "x.jsonl", a.lines(records=a.records[:2] + [fake] + tail, checkpoints=[]))), "--json")
    first = json.loads(r.stdout)["hosts"][0]["problems"][0]
    assert r.returncode == 1 and (first["problem"], first["seq"], first["session"]) == ("inserted", 3, "x"), first


def test_unsigned_tail_is_a_finding(tmp_path, hosts):
    a, _ = hosts
    r = verify("--export", str(write(tmp_path / "x.jsonl", a.lines(checkpoints=a.checkpoints[:1]))))
    assert r.returncode == 1 and "UNSIGNED seq 5" in r.stdout and "seqs 5..9 not yet covered" in r.stdout, r.stdout


def test_pinned_host_missing_from_the_export(tmp_path, hosts):
    a, b = hosts
    r = verify("--export", str(write(tmp_path / "x.jsonl", a.lines())), "--host-key", f"beta={b.key_hex}")
    assert r.returncode == 1 and "MISSING  host beta" in r.stdout, r.stdout


def test_bad_input_is_one_line_with_the_fix(tmp_path, hosts):
    a, _ = hosts
    for content, needle in [("not json\n", "line 1: not JSON"),
                            (json.dumps(R.to_json(a.records[0])) + "\n", "line 1: a record before any host line"),
                            ("\n".join(a.lines()[:1] + ['{"type":"record","host":"h-0001","seq":-1}']), "line 2: not a non-negative 64-bit")]:
        r = verify("--export", str(write(tmp_path / "bad.jsonl", [content])))
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = verify("--export", str(tmp_path / "absent.jsonl"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    r = verify("--export", str(write(tmp_path / "x.jsonl", a.lines())), "--host-key", "alpha=abcd")
    assert r.returncode == 2 and "--host-key alpha: an Ed25519 public key is 32 bytes" in r.stderr


def test_agent_text_is_escaped_in_the_report(tmp_path):
    h = Host("h-\x1b[2Jevil\nOK       host", "n\u202eame")
    recs = list(R.chain(h.host, 1, R.GENESIS, [("event", json.dumps({"session": "s\x1b]0;x\x07"}))]))
    recs[0] = replace(recs[0], body=json.dumps({"session": "s\x1b]0;y\x07"}))
    r = verify("--export", str(write(tmp_path / "x.jsonl", h.lines(records=recs, checkpoints=[]))))
    assert r.returncode == 1 and "\x1b" not in r.stdout and "\u202e" not in r.stdout
    assert r.stdout.count("\n") == len(r.stdout.splitlines()) and "\\x1b[2Jevil\\nOK" in r.stdout


def test_parse_export_and_verify_host_in_process(hosts):
    a, b = hosts
    chains = list(parse_export(a.lines() + b.lines()))
    assert [c.host for c in chains] == ["h-0001", "h-0002"] and len(chains[0].records) == 9
    assert verify_host(chains[0]).ok and verify_host(chains[1], b.key_hex).key_source == "pinned"
    with pytest.raises(ExportError, match="appears twice"):
        list(parse_export(a.lines() + a.lines()))


def test_fleet_options_without_server_are_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "interceptor.cli", "sessions", "--state-dir", str(tmp_path), "--verdict", "deny",
                        "--host", "web-1"], capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "--host, --verdict are for a central recorder: add --server URL" in r.stderr, r.stderr
