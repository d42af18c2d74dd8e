"""Reading the fleet from a central recorder: `sessions/replay/approvals --server`, `export`, `verify`.

A real recorder and PostgreSQL (lab.central) on the lab's server host; two hosts joined to it with
real tokens (`recorder.join`, mTLS certificates, Ed25519 signing keys) that ship chains of records
shaped as their journals write them (lab.records_sample), signed with their own keys. The operator
CLI runs on the agent host, reaching the recorder over the lab link. Tampering is done for real,
with SQL on the recorder's PostgreSQL, and each time the CLI must name exactly the record touched."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lab import records_sample
from lab.central import Central, Client, in_host
from recorder import records as R
from recorder.join import HostFiles, join

REPO = Path(__file__).resolve().parent.parent
T0 = time.time() - 3600  # the sessions started an hour ago


@dataclass
class Shipper:
    """A joined host that ships the chain it builds here (records + a checkpoint over each batch's end)."""

    name: str
    files: HostFiles
    key: object
    records: list[R.Record] = field(default_factory=list)

    def ship(self, lab, url: str, items: list[tuple[str, str]]) -> dict:
        prev = bytes.fromhex(self.records[-1].hash) if self.records else R.GENESIS
        new = list(R.chain(self.files.host_id, len(self.records) + 1, prev, items))
        cp = R.sign_checkpoint(self.key, self.files.host_id, new[-1].seq, bytes.fromhex(new[-1].hash), int(time.time() * 1e6))
        client = Client(url, self.files.ca, self.files.tls_crt, self.files.tls_key)
        body = {"host": self.files.host_id, "records": [R.to_json(r) for r in new], "checkpoints": [R.to_json(cp)]}
        reply = in_host(lab.a, client.post, "/v1/ingest", body)
        assert reply.status == 200, reply.body
        self.records += new
        return reply.json()

    @property
    def key_hex(self) -> str:
        return R.public_key_hex(self.key)


@dataclass
class FleetRig:
    lab: object
    rec: Central
    ops: Path
    hosts: dict[str, Shipper]

    def cli(self, verb: str, *args: str, server: bool = True, credentials: Path | None = None) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "interceptor.cli", verb, *args]
        if server:
            argv += ["--server", self.rec.url, "--credentials", str(credentials or self.ops)]
        return self.lab.a.run(argv, cwd=REPO, timeout=120)

    def sql(self, statement: str) -> str:
        return self.rec.psql(statement)


@pytest.fixture(scope="module")
def rig(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    with Central(lab.b) as rec:
        ops = tmp / "ops"
        rec.cli("operator", "ops", "--state", str(rec.state), "--out", str(ops))
        hosts = {}
        for i, name in enumerate(("alpha", "beta")):
            files = in_host(lab.a, join, tmp / name, rec.url, rec.token(), name)
            h = Shipper(name, files, R.load_signing_key(files.signing_key))
            items = []
            for k in range(3):  # three sessions per host, the last one refused by policy
                sid = f"{int(T0 * 1e6) + 1000 * k:x}{name}{k}"
                items += records_sample.session(sid, T0 + 60 * k + i, agent=f"{name}-bot", verdict="deny" if k == 2 else "allow",
                                                rule="no-drops" if k == 2 else "web-ok", statements=2, event_id=1 + 10 * k,
                                                cmdline="psql -c 'select 1'\n\x1b[2Jfake line" if k == 1 else "psql -c 'select 1'")
            h.ship(lab, rec.url, items)
            hosts[name] = h
        # an approval still pending on beta, in a batch of its own
        hosts["beta"].ship(lab, rec.url, [records_sample.approval("ab12cd34", "s-beta-held", time.time(), agent="beta-bot")])
        yield FleetRig(lab, rec, ops, hosts)


def sid(rig: FleetRig, host: str, k: int) -> str:
    return json.loads(next(r.body for r in rig.hosts[host].records if r.kind == "session-open"
                           and json.loads(r.body)["id"].endswith(f"{host}{k}")))["id"]


# ---- reading -------------------------------------------------------------------------------------

def test_sessions_show_the_whole_fleet_with_a_host_column(rig):
    r = rig.cli("sessions")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["host", "session"]
    assert sum(line.startswith("alpha ") for line in lines) == 3 and sum(line.startswith("beta ") for line in lines) == 3
    rows = json.loads(rig.cli("sessions", "--json").stdout)
    assert {(x["host_name"], x["host"]) for x in rows} == {(n, h.files.host_id) for n, h in rig.hosts.items()}


def test_session_filters(rig):
    def ids(*args: str) -> set[str]:
        r = rig.cli("sessions", "--json", *args)
        assert r.returncode == 0, r.stderr
        return {x["id"] for x in json.loads(r.stdout)}

    assert ids("--host", "alpha") == {sid(rig, "alpha", k) for k in range(3)}
    assert ids("--host", rig.hosts["beta"].files.host_id) == {sid(rig, "beta", k) for k in range(3)}
    assert ids("--agent", "beta-bot") == {sid(rig, "beta", k) for k in range(3)}
    assert ids("--verdict", "deny") == {sid(rig, "alpha", 2), sid(rig, "beta", 2)}
    assert ids("--target", "10.0.0.2:5432", "--host", "alpha") == {sid(rig, "alpha", k) for k in range(3)}
    assert ids("--target", "10.9.9.9") == set()
    # the sessions started at T0, T0+60, T0+120 (+1 s on beta); --since/--until take epoch, ISO or "ago"
    assert ids("--since", str(T0 + 30), "--until", str(T0 + 90)) == {sid(rig, "alpha", 1), sid(rig, "beta", 1)}
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(T0 + 90))
    assert ids("--since", iso) == {sid(rig, "alpha", 2), sid(rig, "beta", 2)}
    assert ids("--since", "30m") == set() and len(ids("--since", "2h")) == 6


def test_replay_from_the_recorder_escapes_agent_text(rig):
    s = sid(rig, "alpha", 1)
    r = rig.cli("replay", s)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"host alpha ({rig.hosts['alpha'].files.host_id})\nsession {s}")
    assert "\x1b" not in r.stdout and "psql -c 'select 1'\\n\\x1b[2Jfake line" in r.stdout
    assert r.stdout.count("ALLOW    postgres:read SELECT id, total FROM orders") == 2
    doc = json.loads(rig.cli("replay", s, "--host", "alpha", "--json").stdout)
    assert doc["session"]["id"] == s and len(doc["events"]) == 2
    r = rig.cli("replay", s, "--host", "beta")
    assert r.returncode == 2 and "no session" in r.stderr and "of host 'beta'" in r.stderr


def test_approvals_across_the_fleet(rig):
    r = rig.cli("approvals")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("beta ") and "ab12cd34" in r.stdout and "pending," in r.stdout
    rows = json.loads(rig.cli("approvals", "--json", "--host", "beta").stdout)
    assert [(x["id"], x["host_name"]) for x in rows] == [("ab12cd34", "beta")]
    assert json.loads(rig.cli("approvals", "--json", "--host", "alpha").stdout) == []
    assert json.loads(rig.cli("approvals", "--json", "--agent", "alpha-bot").stdout) == []


# ---- export and verify ---------------------------------------------------------------------------

def test_export_then_verify_passes(rig, tmp_path):
    out = tmp_path / "fleet.jsonl"
    r = rig.cli("export", "--out", str(out))
    assert r.returncode == 0, r.stderr
    n = sum(len(h.records) for h in rig.hosts.values())
    assert f"exported 2 host(s), {n} record(s), 3 checkpoint(s)" in r.stdout
    assert out.stat().st_mode & 0o777 == 0o600
    r = rig.cli("verify", "--export", str(out), server=False)
    assert r.returncode == 0 and "verify: 2 of 2 host(s) intact" in r.stdout, r.stdout
    pins = [x for h in rig.hosts.values() for x in ("--host-key", f"{h.name}={h.key_hex}")]
    r = rig.cli("verify", *pins)
    assert r.returncode == 0 and r.stdout.count("key pinned") == 2, r.stdout + r.stderr
    r = rig.cli("export", "--host", "beta", "--out", str(tmp_path / "beta.jsonl"))
    assert r.returncode == 0 and "exported 1 host(s)" in r.stdout
    head = json.loads((tmp_path / "beta.jsonl").read_text().splitlines()[0])
    assert head == {"type": "host", "host": rig.hosts["beta"].files.host_id, "name": "beta", "key": rig.hosts["beta"].key_hex}


def _record_row(rig: FleetRig, host: str, seq: int) -> tuple[str, str, str]:
    hid = rig.hosts[host].files.host_id
    kind, session = rig.sql(f"SELECT kind, coalesce(session, '') FROM records WHERE host_id = '{hid}' AND seq = {seq}").split("|")
    return hid, kind, session


@contextlib.contextmanager
def tampering(rig: FleetRig, host: str):
    """Put the host's rows (records, checkpoints, key) back as they were after the test tampered with them."""
    hid = rig.hosts[host].files.host_id
    rig.sql(f"CREATE TABLE bak_records AS SELECT * FROM records WHERE host_id = '{hid}'; "
            f"CREATE TABLE bak_checkpoints AS SELECT * FROM checkpoints WHERE host_id = '{hid}'; "
            f"CREATE TABLE bak_hosts AS SELECT * FROM hosts WHERE host_id = '{hid}'")
    try:
        yield hid
    finally:
        rig.sql(f"DELETE FROM records WHERE host_id = '{hid}'; INSERT INTO records SELECT * FROM bak_records; "
                f"DELETE FROM checkpoints WHERE host_id = '{hid}'; INSERT INTO checkpoints SELECT * FROM bak_checkpoints; "
                f"UPDATE hosts SET signing_key = (SELECT signing_key FROM bak_hosts) WHERE host_id = '{hid}'; "
                "DROP TABLE bak_records, bak_checkpoints, bak_hosts")
    r = rig.cli("verify")
    assert r.returncode == 0, r.stdout + r.stderr


def test_body_edited_in_postgres_is_named(rig, tmp_path):
    host, seq = "beta", 8  # the close of beta's second session (4 records a session)
    old = rig.hosts[host].records[seq - 1].body
    new = old.replace('"bytes_down":1800', '"bytes_down":18')
    assert new != old
    with tampering(rig, host) as hid:
        _, kind, session = _record_row(rig, host, seq)
        assert kind == "session-close" and session
        rig.sql(f"UPDATE records SET body = $b${new}$b$ WHERE host_id = '{hid}' AND seq = {seq}")
        r = rig.cli("verify")
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"FAIL     host beta ({hid}): CHANGED seq {seq} (session-close, session {session})" in r.stdout
        assert "OK       host alpha" in r.stdout and "verify: 1 of 2 host(s) intact, 1 with findings" in r.stdout
        doc = json.loads(rig.cli("verify", "--json").stdout)
        problems = {h["name"]: h["problems"] for h in doc["hosts"]}
        assert problems["alpha"] == [] and [(p["problem"], p["seq"]) for p in problems["beta"]] == [("changed", seq)]
        # the export carries the edit too, and verify of the file names the same record
        out = tmp_path / "edited.jsonl"
        assert rig.cli("export", "--out", str(out)).returncode == 0
        r = rig.cli("verify", "--export", str(out), server=False)
        assert r.returncode == 1 and f"CHANGED seq {seq} (session-close, session {session})" in r.stdout


def test_deleted_rows_are_named_removed(rig):
    host, seq = "alpha", 4
    last = len(rig.hosts[host].records)
    with tampering(rig, host) as hid:
        rig.sql(f"DELETE FROM records WHERE host_id = '{hid}' AND seq = {seq}")
        r = rig.cli("verify", "--host", "alpha")
        assert r.returncode == 1 and f"FAIL     host alpha ({hid}): REMOVED seq {seq}: seq {seq} missing before seq {seq + 1}" \
            in r.stdout, r.stdout + r.stderr
        # the last row too, with the checkpoint over it: the store's own chain head still says where the chain ended
        rig.sql(f"DELETE FROM records WHERE host_id = '{hid}' AND seq = {last}; "
                f"DELETE FROM checkpoints WHERE host_id = '{hid}' AND seq = {last}")
        r = rig.cli("verify", "--host", "alpha", "--json")
        problems = [(p["problem"], p["seq"]) for p in json.loads(r.stdout)["hosts"][0]["problems"]]
        assert r.returncode == 1 and ("removed", seq) in problems and ("removed", last) in problems, problems


def test_forged_rewritten_chain_fails_its_checkpoint(rig):
    """Whoever holds the database rewrites alpha's history and re-hashes every record after the edit:
    every link holds, but the host's signed checkpoint does not; a key swapped in is caught by the pin."""
    h = rig.hosts["alpha"]
    forged = list(R.chain(h.files.host_id, 1, R.GENESIS, [
        (r.kind, r.body.replace('"verdict":"allow"', '"verdict":"deny"') if r.seq == 2 else r.body) for r in h.records]))
    last = len(forged)
    with tampering(rig, "alpha") as hid:
        rig.sql("; ".join(f"UPDATE records SET body = $b${r.body}$b$, hash = decode('{r.hash}', 'hex') WHERE host_id = '{hid}' "
                          f"AND seq = {r.seq}" for r in forged))
        r = rig.cli("verify", "--host", "alpha")
        assert r.returncode == 1 and f"BAD CHECKPOINT seq {last} (session-close" in r.stdout, r.stdout + r.stderr
        assert "CHANGED" not in r.stdout  # every link holds: only the host's signature tells
        # the forger also registers a key of their own and re-signs the head
        mallory = Ed25519PrivateKey.generate()
        cp = R.sign_checkpoint(mallory, hid, last, bytes.fromhex(forged[-1].hash), int(time.time() * 1e6))
        rig.sql(f"UPDATE hosts SET signing_key = '{R.public_key_hex(mallory)}' WHERE host_id = '{hid}'; "
                f"UPDATE checkpoints SET head = decode('{cp.head}', 'hex'), sig = decode('{cp.sig}', 'hex'), at_us = {cp.at_us} "
                f"WHERE host_id = '{hid}' AND seq = {last}")
        assert rig.cli("verify", "--host", "alpha").returncode == 0  # trusting the store's copy of the key, it passes
        r = rig.cli("verify", "--host", "alpha", "--host-key", f"alpha={h.key_hex}")
        assert r.returncode == 1 and "KEY MISMATCH the host's key" in r.stdout and f"BAD CHECKPOINT seq {last}" in r.stdout, r.stdout


def test_hand_edited_export_is_named(rig, tmp_path):
    out = tmp_path / "fleet.jsonl"
    assert rig.cli("export", "--out", str(out)).returncode == 0
    lines = out.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if '"seq": 3' in line and rig.hosts["alpha"].files.host_id in line
             and '"type": "record"' in line)
    item = json.loads(lines[i])
    item["body"] = item["body"].replace("LIMIT 2", "LIMIT 200")
    assert item["body"] != json.loads(lines[i])["body"]
    lines[i] = json.dumps(item)
    out.write_text("\n".join(lines) + "\n")
    r = rig.cli("verify", "--export", str(out), server=False)
    assert r.returncode == 1 and "FAIL     host alpha" in r.stdout and "CHANGED seq 3 (event, session " in r.stdout, r.stdout


# ---- errors an operator can act on --------------------------------------------------------------

def test_errors_say_what_to_do(rig, tmp_path):
    def bad(r: subprocess.CompletedProcess, *needles: str) -> None:
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        for n in needles:
            assert n in r.stderr, (n, r.stderr)

    closed = f"https://{rig.lab.b.addr4}:1"
    bad(rig.lab.a.run([sys.executable, "-m", "interceptor.cli", "sessions", "--server", closed, "--credentials", str(rig.ops)],
                      cwd=REPO), "cannot reach the recorder", "is `interlock recorder serve` running")
    bad(rig.lab.a.run([sys.executable, "-m", "interceptor.cli", "sessions", "--server", rig.rec.url], cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}), "no operator credentials", "interlock recorder operator")
    bad(rig.cli("sessions", credentials=tmp_path), "no client certificate in", "interlock recorder operator")
    # a host's certificate is not an operator's
    host_creds = rig.hosts["alpha"].files.dir
    bad(rig.cli("sessions", credentials=host_creds), "refused the certificate", "not an operator's")
    # credentials of another recorder: its CA does not vouch for this server, nor this server's CA for our certificate
    other, elsewhere = tmp_path / "other-recorder", tmp_path / "other-ops"
    rig.rec.cli("init", "--state", str(other), "--name", "other.test", "--ip", rig.lab.b.addr4)
    rig.rec.cli("operator", "ops", "--state", str(other), "--out", str(elsewhere))
    bad(rig.cli("sessions", credentials=elsewhere), "presented a certificate that", "does not vouch for")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in ("operator.crt", "operator.key"):
        (mixed / f).write_bytes((elsewhere / f).read_bytes())
    (mixed / "ca.pem").write_bytes((rig.ops / "ca.pem").read_bytes())
    bad(rig.cli("sessions", credentials=mixed), "operator certificate")
    bad(rig.lab.a.run([sys.executable, "-m", "interceptor.cli", "sessions", "--server", "http://x:1", "--credentials", str(rig.ops)],
                      cwd=REPO), "--server must be the recorder's https:// URL")
    bad(rig.cli("verify", "--host", "gamma"), "the recorder has no host 'gamma'", "alpha", "beta")
    bad(rig.cli("sessions", "--since", "yesterday"), "--since: 'yesterday' is not a time")
