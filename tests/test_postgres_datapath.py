"""PostgreSQL through the full capture path: real clients (psql, psycopg 3, asyncpg, pgbench) run as
agents in a cgroup, with no endpoint change, against real PostgreSQL 15 servers on the lab's
server host; the proxy parses, judges, holds, masks, injects credentials and records.

Two servers: `pg` (port 5432, no TLS, password roles for the credential tests) and `pgtls`
(port 5433, TLS required for its login role). Targets in the policy pick the mode by the address
the agent dials: the IPv4 address gets injected credentials, the IPv6 address passes the agent's
own authentication through."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lab.instance import INTERLOCK, Instance
from lab.postgres import Postgres
from lab.testing import SLOWDOWN, instance_name, wait_until

pytestmark = pytest.mark.datapath
REPO = Path(__file__).resolve().parent.parent

SCRAM_PW = "S3cret-scram!"
MD5_PW = "md5-Secret-42"
PLAIN_PW = "plain-Secret-43"
TLS_PW = "tls-Secret-44"
OWN_PW = "agents-own-pw"
SECRETS = (SCRAM_PW, MD5_PW, PLAIN_PW, TLS_PW)
EMAILS = ("alice@example.com", "bob@example.org")

POLICY = """\
agents:
  bot: {{groups: [bots]}}
  md5bot: {{groups: [bots]}}
targets:
  pg-cred:
    address: {b4}
    port: 5432
    credentials: {{bot: pg-scram, md5bot: pg-md5, plainbot: pg-plain, strict: pg-md5-strict, "*": pg-scram}}
  pg-tls:
    address: {b4}
    port: 5433
    credentials: pg-tls
  pg-pass:
    address: "{b6}"
    port: [5432, 5433]
rules:
  - name: no-drops
    risk: [drop]
    decision: deny
    reason: nobody drops tables from an agent
  - name: unparseable-sql
    operation: unparseable
    decision: deny
  - name: hold-deletes
    risk: [delete-without-where]
    decision: approve
    timeout: 30s
  - name: hold-truncate
    risk: [truncate]
    decision: approve
    timeout: 2s
  - name: mask-people
    operation: read
    object: ["people", "public.people"]
    decision: mask
    mask: [email, ssn]
default: allow
"""


# Password roles: scram, md5 and cleartext logins, and one role that may only log in over TLS;
# everything else stays trusted.
HBA = ["host all app_scram all scram-sha-256", "host all app_md5 all md5", "host all app_own all scram-sha-256",
       "host all app_plain all password", "hostssl all app_tls all scram-sha-256", "host all app_tls all reject"]


def _server_cert(directory: Path) -> dict[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab-postgres")])
    now = time.time()
    import datetime as dt

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.fromtimestamp(now - 3600, dt.UTC))
            .not_valid_after(dt.datetime.fromtimestamp(now + 86400, dt.UTC)).sign(key, hashes.SHA256()))
    crt, kf = directory / "server.crt", directory / "server.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kf.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    pw = pwd.getpwnam("postgres")
    for f in (directory, crt, kf):
        os.chown(f, pw.pw_uid, pw.pw_gid)
    os.chmod(kf, 0o600)
    return {"ssl": "on", "ssl_cert_file": str(crt), "ssl_key_file": str(kf)}


@pytest.fixture(scope="module")
def pg(lab):
    server = Postgres(lab.b, port=5432, hba=HBA)
    try:
        server.start()
        server.psql(
            f"CREATE ROLE app_scram LOGIN PASSWORD '{SCRAM_PW}';"
            f"SET password_encryption = 'md5'; CREATE ROLE app_md5 LOGIN PASSWORD '{MD5_PW}';"
            f"RESET password_encryption; CREATE ROLE app_plain LOGIN PASSWORD '{PLAIN_PW}';"
            f"CREATE ROLE app_own LOGIN PASSWORD '{OWN_PW}';"
            "GRANT CREATE ON SCHEMA public TO PUBLIC;"
            "CREATE TABLE people (id int PRIMARY KEY, email text, ssn text, note varchar(100));"
            f"INSERT INTO people VALUES (1, '{EMAILS[0]}', '123-45-6789', 'mail {EMAILS[0]} please'),"
            f" (2, '{EMAILS[1]}', '987-65-4321', 'nothing here');"
            "CREATE TABLE keep (id int); CREATE TABLE holdme (id int); CREATE TABLE items (id int, name text);"
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;")
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def pgtls(lab):
    certdir = Path(tempfile.mkdtemp(prefix="interlock-pgtls-cert-"))
    server = Postgres(lab.b, port=5433, settings=_server_cert(certdir), hba=HBA)
    try:
        server.start()
        server.psql(f"CREATE ROLE app_tls LOGIN PASSWORD '{TLS_PW}'")
        yield server
    finally:
        server.close()
        shutil.rmtree(certdir, ignore_errors=True)


@pytest.fixture(scope="module")
def inst(lab, pg, pgtls, tmp_path_factory):
    policy = tmp_path_factory.mktemp("pgpolicy") / "policy.yaml"
    policy.write_text(POLICY.format(b4=lab.b.addr4, b6=lab.b.addr6))
    i = Instance(lab.a, instance_name("pg"), proxy_port=15611, dns_port=15663, policy=str(policy))
    try:
        for name, user, pw, methods in (("pg-scram", "app_scram", SCRAM_PW, None), ("pg-md5", "app_md5", MD5_PW, "md5"),
                                        ("pg-plain", "app_plain", PLAIN_PW, "password"),
                                        ("pg-md5-strict", "app_md5", MD5_PW, None), ("pg-tls", "app_tls", TLS_PW, None)):
            fields = ["--field", f"user={user}"] + (["--field", f"methods={methods}"] if methods else [])
            r = i.cli("credentials", "set", name, "--kind", "postgres", *fields, input=pw + "\n")
            assert r.returncode == 0, r.stderr
        i.start()
        yield i
    finally:
        i.close()


# ---- helpers -------------------------------------------------------------------------------------

def psql(inst: Instance, lab, sql: str, *, agent: str = "bot", user: str = "bot", v6: bool = False, port: int = 5432,
         conn: str = "", env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """psql run as an agent; the SQL goes on stdin (never on the recorded command line)."""
    host = lab.b.addr6 if v6 else lab.b.addr4
    dsn = f"host={host} port={port} user={user} dbname=postgres {conn}".strip()
    cmd = ["psql", dsn, "-X", "-A", "-t", "-q", "-f", "-"]
    if env:
        cmd = ["env", *(f"{k}={v}" for k, v in env.items()), *cmd]
    return inst.agent(cmd, agent=agent, input=sql, timeout=timeout * SLOWDOWN)


def py(inst: Instance, code: str, *, agent: str = "bot", timeout: float = 60, **fmt) -> dict:
    """A Python client run as an agent; it prints one JSON line last. The code goes on stdin, so
    the values in it never reach the session's recorded command line."""
    src = textwrap.dedent(code).format(**fmt) if fmt else textwrap.dedent(code)
    r = inst.agent([sys.executable, "-"], agent=agent, timeout=timeout * SLOWDOWN, cwd=REPO, input=src)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"no result: rc={r.returncode} stdout={r.stdout[-2000:]} stderr={r.stderr[-3000:]}") from None


def dsn(lab, *, user: str = "bot", v6: bool = False, port: int = 5432, extra: str = "") -> str:
    host = lab.b.addr6 if v6 else lab.b.addr4
    return f"host={host} port={port} user={user} dbname=postgres {extra}".strip()


def statements(inst: Instance) -> list[dict]:
    return [e["data"] for e in inst.events("statement")]


def pending(inst: Instance) -> list[dict]:
    return json.loads(inst.cli("approvals", "--json").stdout)


def recorder_bytes(inst: Instance) -> bytes:
    db = inst.state_dir / "recorder.db"
    return b"".join(p.read_bytes() for p in (db, db.with_name("recorder.db-wal")) if p.exists())


def proxy_pids(inst: Instance) -> list[int]:
    """Every proxy worker (`workers:`): a connection lands on any of them."""
    return [int(p) for p in inst.status()["proxy_pids"]]


# ---- startup, TLS, authentication ----------------------------------------------------------------

def test_psql_with_injected_credential_and_no_password(inst, lab):
    # the agent names itself "bot" and has no password; the proxy logs in as app_scram with SCRAM
    r = psql(inst, lab, "select current_user, session_user;", env={"PGPASSWORD": ""})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "app_scram|app_scram"
    r = psql(inst, lab, "select current_user;", agent="md5bot", user="whoever")
    assert r.returncode == 0 and r.stdout.strip() == "app_md5", r.stderr
    r = psql(inst, lab, "select current_user;", agent="plainbot")
    assert r.returncode == 0 and r.stdout.strip() == "app_plain", r.stderr
    logins = [e["data"] for e in inst.events("postgres-upstream-auth")]
    assert {"scram-sha-256", "md5", "password"} <= {x["method"] for x in logins}


def test_md5_needs_the_credential_to_allow_it(inst, lab):
    # the scram module's safety default: a credential without methods= only does SCRAM
    r = psql(inst, lab, "select 1;", agent="strict")
    assert "upstream login failed" in r.stderr and "md5" in r.stderr


def test_secrets_appear_in_no_recording_and_not_to_the_agent(inst, lab):
    r = psql(inst, lab, "select current_setting('application_name');", env={"PGAPPNAME": "probe"})
    assert r.returncode == 0
    blob = recorder_bytes(inst)
    for secret in SECRETS:
        assert secret.encode() not in blob
        assert secret not in r.stdout + r.stderr
    # the key the agent holds for cancelling is not the server's (see the cancel test), and the
    # sealed store is not readable as text
    assert not any(s.encode() in (inst.state_dir / "credentials.sealed").read_bytes() for s in SECRETS)


def test_sslmode_require_and_verify_full_against_the_interlock_ca(inst, lab):
    ca = inst.state_dir / "ca" / "ca.pem"
    out = py(inst, """
        import json, psycopg
        res = {{}}
        for mode in ("require", "verify-full"):
            with psycopg.connect("{dsn} sslmode=" + mode + " sslrootcert={ca}") as c:
                res[mode] = [c.pgconn.ssl_in_use, c.execute("select 7").fetchone()[0]]
        print(json.dumps(res))
    """, dsn=dsn(lab), ca=ca)
    assert out == {"require": [True, 7], "verify-full": [True, 7]}


def test_upstream_tls_when_the_server_requires_it_with_channel_binding(inst, lab, pgtls):
    r = psql(inst, lab, "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid();", port=5433)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "app_tls|t"
    auth = [e["data"] for e in inst.events("postgres-upstream-auth")]
    assert any(a["channel_binding"] for a in auth), "SCRAM-SHA-256-PLUS bound to the server's certificate"


def test_pass_through_keeps_the_agents_own_authentication(inst, lab):
    ok = psql(inst, lab, "select current_user;", user="app_own", v6=True, env={"PGPASSWORD": OWN_PW})
    assert ok.returncode == 0 and ok.stdout.strip() == "app_own", ok.stderr
    bad = psql(inst, lab, "select 1;", user="app_own", v6=True, env={"PGPASSWORD": "wrong"})
    assert bad.returncode != 0 and "password authentication failed" in bad.stderr
    # through TLS to the agent as well (the agent cannot bind to the server's certificate: no -PLUS offered)
    tls = psql(inst, lab, "select current_user;", user="app_own", v6=True, conn="sslmode=require",
               env={"PGPASSWORD": OWN_PW})
    assert tls.returncode == 0 and tls.stdout.strip() == "app_own", tls.stderr
    modes = {e["data"]["mode"] for e in inst.events("postgres-login")}
    assert modes == {"credential", "pass-through"}


def test_gssenc_declined_then_tls_at_the_wire_level(inst, lab):
    out = py(inst, """
        import json, socket, ssl, struct
        from proxy.postgres import wire
        s = socket.create_connection(("{host}", 5432), timeout=10)
        s.sendall(struct.pack("!II", 8, wire.GSSENC_REQUEST_CODE))
        gss = s.recv(1)
        s.sendall(wire.ssl_request())
        tls = s.recv(1)
        ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
        t = ctx.wrap_socket(s)
        t.sendall(wire.startup_message({{"user": "bot", "database": "postgres"}}) + wire.query("select 40 + 2"))
        r = wire.FrameReader("backend"); seen = []
        while not any(isinstance(m, wire.ReadyForQuery) for m in seen[1:]) or not any(isinstance(m, wire.DataRow) for m in seen):
            r.feed(t.recv(65536)); seen += list(r.messages())
        rows = [bytes(m.values[0]).decode() for m in seen if isinstance(m, wire.DataRow)]
        print(json.dumps({{"gss": gss.decode(), "tls": tls.decode(), "version": t.version(), "rows": rows}}))
    """, host=lab.b.addr4)
    assert out["gss"] == "N" and out["tls"] == "S" and out["version"].startswith("TLS") and out["rows"] == ["42"]


def test_cancel_request_is_mapped_to_the_real_backend_key(inst, lab):
    out = py(inst, """
        import json, threading, time, psycopg, socket, os
        from proxy.postgres import wire
        res = {{}}
        for how in ("cancel", "cancel_safe", "wrong-key"):
            with psycopg.connect("{dsn}", autocommit=True) as c:
                def fire():
                    time.sleep(0.7 * {slow})
                    if how == "wrong-key":
                        s = socket.create_connection(("{host}", 5432), timeout=5)
                        s.sendall(wire.cancel_request(c.pgconn.backend_pid, os.urandom(4)))
                        s.recv(10); s.close()
                    else:
                        getattr(c, how)()
                threading.Thread(target=fire).start()
                t0 = time.monotonic()
                try:
                    c.execute(f"select pg_sleep({{3 * {slow}}})")
                    res[how] = ["completed", round(time.monotonic() - t0, 1)]
                except psycopg.errors.QueryCanceled:
                    res[how] = ["canceled", round(time.monotonic() - t0, 1)]
        print(json.dumps(res))
    """, dsn=dsn(lab), host=lab.b.addr4, slow=SLOWDOWN)
    assert out["cancel"][0] == "canceled" and out["cancel"][1] < 2.5 * SLOWDOWN
    assert out["cancel_safe"][0] == "canceled" and out["cancel_safe"][1] < 2.5 * SLOWDOWN
    assert out["wrong-key"][0] == "completed", "a key the proxy did not issue cancels nothing"
    cancels = [e["data"] for e in inst.events("decision") if e["data"]["action"] == "cancel"]
    assert len(cancels) >= 3


# ---- the protocol ------------------------------------------------------------------------------

def test_simple_query_several_statements_notices_notify_and_parameter_status(inst, lab):
    r = psql(inst, lab, "select 1; select 'two'; create table if not exists keep (id int);")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "two"]
    assert "already exists, skipping" in r.stderr  # a NOTICE
    out = py(inst, """
        import json, psycopg
        with psycopg.connect("{dsn}", autocommit=True) as c:
            c.execute("set application_name = 'agent-x'")
            app = c.info.parameter_status("application_name")
            c.execute("listen ch")
            c.execute("notify ch, 'hello'")
            n = next(c.notifies(timeout=5))
            print(json.dumps({{"app": app, "notify": [n.channel, n.payload, n.pid == c.pgconn.backend_pid]}}))
    """, dsn=dsn(lab))
    assert out == {"app": "agent-x", "notify": ["ch", "hello", True]}


def test_extended_protocol_pipelined_prepared_binary_and_transactions(inst, lab):
    out = py(inst, """
        import json, psycopg
        with psycopg.connect("{dsn}") as c:
            c.execute("delete from items where id >= 0")
            with c.pipeline():
                for i in range(20):
                    c.execute("insert into items values (%s, %s)", (i, f"n{{i}}"))
                c.execute("select count(*) from items", prepare=True)
            c.commit()
            named = [c.execute("select name from items where id = %s", (i,), prepare=True).fetchone()[0] for i in range(8)]
            b = c.cursor(binary=True)
            b.execute("select id, name, now() from items where id < %s order by id", (3,))
            binary = [[r[0], r[1]] for r in b.fetchall()]
            c.execute("insert into items values (100, 'rolled back')")
            c.rollback()
            gone = c.execute("select count(*) from items where id = 100").fetchone()[0]
            with c.transaction():
                c.execute("insert into items values (101, 'kept')")
            kept = c.execute("select count(*) from items where id = 101").fetchone()[0]
            cur = c.cursor(name="srv")
            cur.execute("select id from items order by id")
            first = cur.fetchmany(5)
            c.commit()
        print(json.dumps({{"named": named, "binary": binary, "gone": gone, "kept": kept, "first": [r[0] for r in first]}}))
    """, dsn=dsn(lab))
    assert out["named"] == [f"n{i}" for i in range(8)]
    assert out["binary"] == [[0, "n0"], [1, "n1"], [2, "n2"]]
    assert out["gone"] == 0 and out["kept"] == 1 and out["first"] == [0, 1, 2, 3, 4]
    recorded = statements(inst)
    inserts = [s for s in recorded if s["summary"].startswith("insert into items values ($1")]
    assert len(inserts) >= 20 and inserts[0]["params"] == ["0", "n0"] and inserts[0]["rows"] == 1


def test_asyncpg_named_statements_binary_rows(inst, lab):
    out = py(inst, """
        import asyncio, json, asyncpg
        async def main():
            c = await asyncpg.connect(host="{host}", port=5432, user="bot", database="postgres")
            rows = await c.fetch("select id, name from items where id between $1 and $2 order by id", 0, 2)
            st = await c.prepare("select count(*) from items where id < $1")
            n = [await st.fetchval(i) for i in (1, 5)]
            async with c.transaction():
                await c.execute("insert into items values (200, 'async')")
            await c.close()
            return {{"rows": [[r["id"], r["name"]] for r in rows], "n": n}}
        print(json.dumps(asyncio.run(main())))
    """, host=lab.b.addr4)
    assert out == {"rows": [[0, "n0"], [1, "n1"], [2, "n2"]], "n": [1, 5]}


def test_copy_in_and_out_and_large_results_stream(inst, lab):
    rows = "".join(f"{i}\tname {i}\n" for i in range(50_000))
    r = psql(inst, lab, "create table if not exists bulk (id int, name text); delete from bulk where id >= 0;")
    assert r.returncode == 0, r.stderr
    r = psql(inst, lab, "copy bulk from stdin;\n" + rows + "\\.\nselect count(*) from bulk;")
    assert r.returncode == 0 and r.stdout.strip() == "50000", r.stderr
    out = py(inst, """
        import json, psycopg
        with psycopg.connect("{dsn}") as c:
            with c.cursor().copy("copy (select id, name from bulk order by id) to stdout") as cp:
                got = b"".join(bytes(b) for b in cp)
            with c.cursor().copy("copy items (id, name) from stdin") as cp:
                cp.write_row((300, "copied"))
            c.commit()
        print(json.dumps({{"lines": got.count(b"\\n"), "last": got.splitlines()[-1].decode()}}))
    """, dsn=dsn(lab))
    assert out == {"lines": 50_000, "last": "49999\tname 49999"}
    before = sum(_hwm(p) for p in proxy_pids(inst))  # the sum grows at least as the relaying worker's
    big = psql(inst, lab, "select length(repeat('x', 64 * 1024 * 1024)) = 67108864, md5(repeat('x', 1000));"
                          "select repeat('y', 48 * 1024 * 1024);", timeout=120)
    assert big.returncode == 0, big.stderr[-500:]
    assert len(big.stdout) > 48 * 1024 * 1024
    many = psql(inst, lab, "select count(*) from (select g, repeat('z', 200) from generate_series(1, 300000) g) s;"
                           "select g, repeat('z', 200) from generate_series(1, 300000) g;", timeout=120)
    assert many.returncode == 0 and many.stdout.count("\n") >= 300_000
    grown = sum(_hwm(p) for p in proxy_pids(inst)) - before
    assert grown < 40 * 1024, f"the proxy's peak RSS grew {grown} kB while relaying 48 MB rows: buffered"


def _hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_malformed_and_oversized_messages_get_an_error_and_a_clean_close(inst, lab):
    pids = proxy_pids(inst)
    out = py(inst, """
        import json, socket, struct
        from proxy.postgres import wire
        res = {{}}
        cases = {{"unknown-type": b"Y\\x00\\x00\\x00\\x04", "oversized": b"Q" + struct.pack("!I", 300 * 1024 * 1024),
                  "bad-length": b"Q\\x00\\x00\\x00\\x02"}}
        for name, payload in cases.items():
            s = socket.create_connection(("{host}", 5432), timeout=10)
            s.sendall(wire.startup_message({{"user": "bot", "database": "postgres"}}))
            r = wire.FrameReader("backend")
            msgs = []
            while not any(isinstance(m, wire.ReadyForQuery) for m in msgs):
                r.feed(s.recv(65536)); msgs += list(r.messages())
            s.sendall(payload)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk: break
                data += chunk
            err = wire.read_messages("backend", data)[0]
            res[name] = [err.severity, err.code, err.message[:80]]
        print(json.dumps(res))
    """, host=lab.b.addr4)
    assert out["unknown-type"][:2] == ["FATAL", "08P01"]
    assert out["bad-length"][:2] == ["FATAL", "08P01"]
    assert out["oversized"][:2] == ["FATAL", "54000"]
    assert proxy_pids(inst) == pids, "the proxy stayed up"
    assert psql(inst, lab, "select 1;").stdout.strip() == "1"


# ---- guardrails ---------------------------------------------------------------------------------

def test_drop_is_refused_naming_the_rule_and_never_reaches_the_server(inst, lab, pg):
    r = psql(inst, lab, "drop table keep;")
    assert "interlock: statement refused by rule 'no-drops'" in r.stderr and "nobody drops tables" in r.stderr
    assert pg.psql("select count(*) from pg_tables where tablename = 'keep'") == "1"
    # a refused statement refuses the whole string: the first statement does not run either
    r = psql(inst, lab, "insert into items values (400, 'x') \\; drop table keep;")  # one Query message
    assert "refused" in r.stderr and pg.psql("select count(*) from items where id = 400") == "0"
    r = psql(inst, lab, "selec 1;")  # the server's own answer to text it cannot parse; on record as refused
    assert 'ERROR:  syntax error at or near "selec"' in r.stderr and "LINE 1: selec 1;" in r.stderr, r.stderr
    assert any(e["data"]["rule"] == "unparseable-sql" and e["data"]["summary"] == "selec 1;"
               for e in inst.events("decision"))
    sqlstate = py(inst, """
        import json, psycopg
        with psycopg.connect("{dsn}", autocommit=True) as c:
            try:
                c.execute("drop table keep")
            except psycopg.Error as e:
                print(json.dumps([e.sqlstate, c.execute("select 5").fetchone()[0]]))
    """, dsn=dsn(lab))
    assert sqlstate == ["42501", 5], "the session stays usable after a refusal"


def test_refusal_inside_a_transaction_fails_it_on_both_ends(inst, lab, pg):
    # simple protocol: the server is made to fail the transaction too, so COMMIT rolls back
    r = psql(inst, lab, "begin; insert into items values (500, 'in tx'); drop table keep; commit;"
                        " select count(*) from items where id = 500;")
    assert "refused by rule 'no-drops'" in r.stderr
    assert "current transaction is aborted" in r.stderr or r.stdout.strip().endswith("0")
    assert pg.psql("select count(*) from items where id = 500") == "0"
    # extended protocol: psycopg sees the failed transaction state, rolls back, and carries on
    out = py(inst, """
        import json, psycopg
        res = {{}}
        with psycopg.connect("{dsn}") as c:
            c.execute("insert into items values (501, 'in tx')")
            try:
                c.execute("drop table keep")
            except psycopg.errors.InsufficientPrivilege as e:
                res["error"] = e.sqlstate
            res["status"] = c.info.transaction_status.name
            try:
                c.execute("select 1")
            except psycopg.errors.InFailedSqlTransaction:
                res["then"] = "in failed transaction"
            c.rollback()
            res["after"] = c.execute("select count(*) from items where id = 501").fetchone()[0]
            with c.pipeline() as p:
                c.execute("insert into items values (502, 'pipelined')")
                try:
                    c.execute("drop table keep")
                    p.sync()
                except psycopg.errors.InsufficientPrivilege:
                    res["pipeline"] = "refused"
            c.rollback()
            res["pipeline_after"] = c.execute("select count(*) from items where id in (501, 502)").fetchone()[0]
        print(json.dumps(res))
    """, dsn=dsn(lab))
    assert out == {"error": "42501", "status": "INERROR", "then": "in failed transaction", "after": 0,
                   "pipeline": "refused", "pipeline_after": 0}


def _background_psql(inst, lab, sql: str) -> subprocess.Popen:
    script = Path(tempfile.mkstemp(prefix="held-", suffix=".sql", dir=inst.state_dir)[1])
    script.write_text(sql)
    cmd = [*INTERLOCK, "run", "--state-dir", str(inst.state_dir), "--agent", "bot", "--",
           "psql", dsn(lab), "-X", "-A", "-t", "-q", "-f", str(script)]
    return inst.host.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_delete_without_where_is_held_until_approved(inst, lab, pg):
    pg.psql("insert into holdme select generate_series(1, 5)")
    p = _background_psql(inst, lab, "delete from holdme; select 'after';")
    held = wait_until(lambda: pending(inst), timeout=15)
    assert held and held[0]["rule"] == "hold-deletes" and held[0]["summary"] == "delete from holdme"
    time.sleep(0.5)
    assert pg.psql("select count(*) from holdme") == "5", "nothing reaches the server while held"
    assert inst.cli("approve", held[0]["id"]).returncode == 0
    out, err = p.communicate(timeout=30 * SLOWDOWN)
    assert p.returncode == 0 and out.strip() == "after", err
    assert pg.psql("select count(*) from holdme") == "0"
    # denied by a human: an error like a refusal, and the session goes on
    pg.psql("insert into holdme values (1)")
    p = _background_psql(inst, lab, "delete from holdme;\nselect 'still here';")
    held = wait_until(lambda: pending(inst), timeout=15)
    assert inst.cli("deny", held[0]["id"], "--reason", "not today").returncode == 0
    out, err = p.communicate(timeout=30 * SLOWDOWN)
    assert "not approved (denied) under rule 'hold-deletes'" in err and out.strip() == "still here"
    assert pg.psql("select count(*) from holdme") == "1"


def test_held_statement_in_the_extended_protocol_and_an_expired_hold(inst, lab, pg):
    cmd = [*INTERLOCK, "run", "--state-dir", str(inst.state_dir), "--agent", "bot", "--", sys.executable, "-c",
           textwrap.dedent(f"""
               import json, psycopg
               with psycopg.connect("{dsn(lab)}", autocommit=True) as c:
                   n = c.execute("delete from holdme").rowcount
                   print(json.dumps({{"deleted": n}}))
           """)]
    p = inst.host.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held = wait_until(lambda: pending(inst), timeout=15)
    assert held, p.stderr.read() if p.poll() is not None else "no approval requested"
    assert pg.psql("select count(*) from holdme") == "1"
    inst.cli("approve", held[0]["id"])
    out, err = p.communicate(timeout=30 * SLOWDOWN)
    assert json.loads(out.strip().splitlines()[-1]) == {"deleted": 1}, err
    t0 = time.monotonic()
    r = psql(inst, lab, "truncate keep;")  # held under a 2s timeout that nobody answers
    assert "not approved (expired) under rule 'hold-truncate'" in r.stderr
    assert 1.5 < time.monotonic() - t0 < 15 * SLOWDOWN


def test_function_call_by_oid_is_refused(inst, lab):
    out = py(inst, """
        import json, socket, struct
        from proxy.postgres import wire
        s = socket.create_connection(("{host}", 5432), timeout=10)
        s.sendall(wire.startup_message({{"user": "bot", "database": "postgres"}}))
        r = wire.FrameReader("backend"); msgs = []
        def until_ready():
            got = []
            while not any(isinstance(m, wire.ReadyForQuery) for m in got):
                r.feed(s.recv(65536)); got += list(r.messages())
            return got
        until_ready()
        s.sendall(wire.FunctionCall(1299, (), (), 0).encode())  # now()
        got = until_ready()
        s.sendall(wire.query("select 9"))
        after = until_ready()
        err = next(m for m in got if isinstance(m, wire.ErrorResponse))
        row = next(m for m in after if isinstance(m, wire.DataRow))
        print(json.dumps([err.code, err.message, bytes(row.values[0]).decode()]))
    """, host=lab.b.addr4)
    assert out[0] == "42501" and "builtin:function-call" in out[1] and out[2] == "9"


# ---- masking and the recording ------------------------------------------------------------------

def test_masked_columns_text_binary_and_copy(inst, lab):
    r = psql(inst, lab, "select id, email, ssn, note from people order by id;")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "1|[masked:email]|[masked:ssn]|mail [masked:email] please"
    assert not any(e in r.stdout for e in EMAILS)
    out = py(inst, """
        import asyncio, json, asyncpg, psycopg
        async def viaasync():
            c = await asyncpg.connect(host="{host}", port=5432, user="bot", database="postgres")
            rows = await c.fetch("select id, email, ssn from people where id = $1", 1)
            await c.close()
            return [list(r) for r in rows]
        with psycopg.connect("{dsn}") as c:
            b = c.cursor(binary=True)
            b.execute("select email, note from people where id = %s", (1,))
            binary = list(b.fetchone())
            with c.cursor().copy("copy people to stdout") as cp:
                copied = b"".join(bytes(x) for x in cp).decode()
        print(json.dumps({{"asyncpg": asyncio.run(viaasync()), "binary": binary, "copy": copied}}))
    """, dsn=dsn(lab), host=lab.b.addr4)
    assert out["asyncpg"] == [[1, "[masked:email]", "[masked:ssn]"]]
    assert out["binary"] == ["[masked:email]", "mail [masked:email] please"]
    assert "[masked:email]" in out["copy"] and not any(e in out["copy"] for e in EMAILS)
    masked = [s for s in statements(inst) if s.get("masked")]
    assert masked and masked[0]["verdict"] == "mask"


def test_recording_masks_statement_text_and_parameters(inst, lab, pg):
    out = py(inst, """
        import json, psycopg
        with psycopg.connect("{dsn}", autocommit=True) as c:
            c.execute("insert into items values (%s, %s)", (600, "carol@example.net"))
            c.execute("insert into items values (601, 'dave@example.net')")
        print(json.dumps("ok"))
    """, dsn=dsn(lab))
    assert out == "ok"
    assert pg.psql("select count(*) from items where name like '%@example.net'") == "2"
    blob = recorder_bytes(inst)
    assert b"carol@example.net" not in blob and b"dave@example.net" not in blob
    for e in EMAILS:
        assert e.encode() not in blob
    recorded = statements(inst)
    assert any(s.get("params") == ["600", "[masked:email]"] for s in recorded)
    assert any("[masked:email]" in s["summary"] and "601" in s["summary"] for s in recorded)


def test_replay_shows_each_statement(inst, lab):
    r = psql(inst, lab, "select 11; drop table keep;")
    r = psql(inst, lab, "select count(*) from people;")
    assert r.returncode == 0
    sessions = [s for s in inst.sessions() if s["protocol"] == "postgres"]
    replay = inst.cli("replay", sessions[-1]["id"]).stdout
    assert "statement" in replay and "select count(*) from people" in replay and "SELECT 1" in replay
    refused = next(s for s in reversed(sessions) if s["id"] != sessions[-1]["id"])
    text = inst.cli("replay", refused["id"]).stdout
    assert "DENY" in text and "no-drops" in text


def test_pgbench_simple_and_extended(inst, lab, pg):
    r = lab.b.run(["pgbench", "-i", "-q", "-s", "1", *pg.client_args(), "postgres"], timeout=120)
    assert r.returncode == 0, r.stderr
    pg.psql("GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC")
    for mode in ("simple", "extended", "prepared"):
        r = inst.agent(["pgbench", "-n", "-S", "-M", mode, "-c", "2", "-t", "200", "-h", lab.b.addr4, "-U", "bot",
                        "postgres"], timeout=120)
        assert r.returncode == 0 and "number of failed transactions: 0" in r.stdout, r.stdout + r.stderr


def test_cancel_while_held_gives_up_the_statement(inst, lab, pg):
    pg.psql("insert into holdme values (7)")
    out = py(inst, """
        import json, threading, time, psycopg
        with psycopg.connect("{dsn}", autocommit=True) as c:
            threading.Thread(target=lambda: (time.sleep(1.5 * {slow}), c.cancel())).start()
            t0 = time.monotonic()
            try:
                c.execute("delete from holdme")
                res = ["ran"]
            except psycopg.errors.QueryCanceled as e:
                res = ["canceled", e.diag.message_detail]
            res.append(c.execute("select count(*) from holdme").fetchone()[0])
            res.append(round(time.monotonic() - t0, 1))
        print(json.dumps(res))
    """, dsn=dsn(lab), slow=SLOWDOWN)
    assert out[0] == "canceled" and "held for approval under rule 'hold-deletes'" in out[1]
    assert out[2] >= 1 and out[3] < 10 * SLOWDOWN
    assert any(e["kind"] == "hold-canceled" for e in inst.events("hold-canceled"))


def test_settings_that_change_how_sql_reads(inst, lab, pg):
    out = py(inst, r"""
        import json, psycopg
        res = {{}}
        with psycopg.connect("{dsn}", autocommit=True) as c:
            c.execute("set client_encoding to 'LATIN1'")  # ASCII-safe: fine
            res["latin1"] = c.execute("select 1").fetchone()[0]
        for name, change, follow in (("std", "set standard_conforming_strings = off", "insert into items values (700, 'a\\b')"),
                                     ("sjis", "select set_config('client_encoding', 'SJIS', false)",
                                      "insert into items values (701, 'caf\u00e9')")):
            got = []
            with psycopg.connect("{dsn}", autocommit=True) as c:
                try:
                    with c.pipeline():
                        c.execute(change)
                        c.execute(follow)
                except psycopg.Error as e:
                    got.append(e.sqlstate)
                # the refusal failed the implicit transaction, the change with it: the session goes on
                got.append(c.execute("select current_setting('client_encoding'), current_setting("
                                     "'standard_conforming_strings')").fetchone())
                try:
                    c.execute(change)  # now the change itself: the server reports it
                    c.execute("select 1")
                    got.append("survived")
                except psycopg.Error as e:
                    got.append(str(e).splitlines()[0][:160])
            res[name] = got
        print(json.dumps(res))
    """, dsn=dsn(lab))
    assert out["latin1"] == 1
    for name in ("std", "sjis"):
        assert out[name][0] == "42501", out  # the ambiguous statement in the window is refused
        assert out[name][1] == ["UTF8", "on"], out
    assert "cannot read SQL under" in out["sjis"][-1], out  # an unsafe encoding that sticks ends the session
    assert out["std"][-1] == "survived", out  # standard_conforming_strings=off is followed (test_pg_flows_datapath)
    assert pg.psql("select count(*) from items where id in (700, 701)") == "0"


def test_wire_level_named_portals_suspended_close_and_flush_with_masking(inst, lab):
    # The messages drivers rarely combine: a named statement described, a named portal read two
    # rows at a time (PortalSuspended), Close of both, Flush, then Sync; the rows are masked.
    out = py(inst, """
        import json, socket
        from proxy.postgres import wire
        s = socket.create_connection(("{host}", 5432), timeout=10)
        r = wire.FrameReader("backend")
        def until(kind):
            got = []
            while not any(isinstance(m, kind) for m in got):
                r.feed(s.recv(65536)); got += list(r.messages())
            return got
        s.sendall(wire.startup_message({{"user": "bot", "database": "postgres"}}))
        until(wire.ReadyForQuery)
        s.sendall(wire.Parse("st", "select id, email from people order by id", ()).encode()
                  + wire.Describe("S", "st").encode() + wire.Bind("po", "st", (), (), (0, 1)).encode()
                  + wire.Execute("po", 1).encode() + wire.Flush().encode())
        first = until(wire.PortalSuspended)
        s.sendall(wire.Execute("po", 1).encode() + wire.Close("P", "po").encode() + wire.Close("S", "st").encode()
                  + wire.sync())
        rest = until(wire.ReadyForQuery)
        rows = [[bytes(v).decode() for v in m.values] for m in first + rest if isinstance(m, wire.DataRow)]
        kinds = [type(m).__name__ for m in first + rest]
        s.sendall(wire.Bind("", "st", (), (), ()).encode() + wire.Execute("", 0).encode() + wire.sync())
        gone = [m.code for m in until(wire.ReadyForQuery) if isinstance(m, wire.ErrorResponse)]
        print(json.dumps({{"rows": rows, "kinds": kinds, "gone": gone}}))
    """, host=lab.b.addr4)
    assert out["rows"] == [["1", "[masked:email]"], ["2", "[masked:email]"]]
    assert out["kinds"].count("PortalSuspended") == 2 and out["kinds"].count("CloseComplete") == 2
    assert "ParameterDescription" in out["kinds"] and "RowDescription" in out["kinds"]
    # the statement was closed: binding it again gets the server's own error
    assert out["gone"] == ["26000"]


def test_cancel_sent_to_another_address_is_refused_and_cancels_nothing(inst, lab):
    # The agent's session goes to the server's IPv4 address; it cancels through the IPv6 one with
    # the key the proxy gave it. The cancel is judged for the destination it was sent to, so it
    # goes nowhere else: refused on record, and the statement runs to its end (a cancel sent to
    # some other service must not reach a database whose rules refuse it —
    # tests/adversarial/test_pg_cancel_policy.py). libpq, psycopg, asyncpg and JDBC cancel to the
    # session's own address; that control is test_cancel_request_is_mapped_to_the_real_backend_key above.
    out = py(inst, """
        import json, socket, threading, time
        from proxy.postgres import wire
        s = socket.create_connection(("{b4}", 5432), timeout=10)
        r = wire.FrameReader("backend")
        def until_ready():
            got = []
            while not any(isinstance(m, wire.ReadyForQuery) for m in got):
                r.feed(s.recv(65536)); got += list(r.messages())
            return got
        s.sendall(wire.startup_message({{"user": "bot", "database": "postgres"}}))
        key = next(m for m in until_ready() if isinstance(m, wire.BackendKeyData))
        def cancel():
            time.sleep(0.7 * {slow})
            c = socket.create_connection(("{b6}", 5432), timeout=10)
            c.sendall(wire.cancel_request(key.pid, key.key))
            c.recv(10); c.close()
        threading.Thread(target=cancel).start()
        t0 = time.monotonic()
        s.sendall(wire.query(f"select pg_sleep({{5 * {slow}}})"))
        err = [m.code for m in until_ready() if isinstance(m, wire.ErrorResponse)]
        print(json.dumps([err, round(time.monotonic() - t0, 1)]))
    """, b4=lab.b.addr4, b6=lab.b.addr6, slow=SLOWDOWN)
    assert out[0] == [] and out[1] >= 4.5 * SLOWDOWN, out  # not cancelled: it slept its 5 s
    refused = [s for s in inst.sessions() if s["outcome"] == "refused" and "judged where it is sent" in (s["detail"] or "")]
    assert refused and refused[-1]["dst_addr"] == lab.b.addr6, refused
