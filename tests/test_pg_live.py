"""wire + scram + masking + statements against a real PostgreSQL 15 on 127.0.0.1.

The server runs from a temp dir (deleted afterwards) as the `postgres` user, with
password_encryption=scram-sha-256 and pg_hba choosing scram, md5 or cleartext per role. The test
client is a plain blocking socket driving the sans-IO pieces, which is what the relay will do
with asyncio."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from proxy.postgres import wire
from proxy.postgres.masking import RowMasker
from proxy.postgres.scram import AuthenticationError, UpstreamAuthenticator
from proxy.postgres.statements import SqlAnalyzer

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SCRAM_PASSWORD = "sc\u2168ram pw"  # U+2168 ROMAN NUMERAL NINE: SASLprep turns it into "IX"
MD5_PASSWORD = "md5 secret"
PLAIN_PASSWORD = "plain secret"

pytestmark = pytest.mark.skipif(not (PG_BIN / "postgres").exists(), reason="PostgreSQL 15 is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    # setpriv execs in place, so the PID we hold is the postmaster's own.
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *cmd]


@pytest.fixture(scope="module")
def pg():
    tmp = Path(tempfile.mkdtemp(prefix="interlock-pgwire-"))
    proc = None
    try:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(tmp, pw.pw_uid, pw.pw_gid)
        data = tmp / "data"
        subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                                     "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"]),
                       check=True, capture_output=True, timeout=120, cwd=tmp)
        (data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all md5user 127.0.0.1/32 md5\n"
            "host all pwuser 127.0.0.1/32 password\n"
            "host all trustuser 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n")
        port = _free_port()
        log = open(tmp / "log", "wb")
        proc = subprocess.Popen(
            _as_postgres([str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(tmp),
                          "-c", "listen_addresses=127.0.0.1", "-c", "password_encryption=scram-sha-256",
                          "-c", "fsync=off", "-c", "ssl=off"]),
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=tmp)
        deadline = time.monotonic() + 60
        while True:
            r = subprocess.run([str(PG_BIN / "pg_isready"), "-q", "-h", str(tmp), "-p", str(port)], timeout=10)
            if r.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("postgres did not start: " + (tmp / "log").read_text(errors="replace")[-2000:])
            time.sleep(0.1)

        def psql(sql: str) -> str:
            r = subprocess.run([str(PG_BIN / "psql"), "-h", str(tmp), "-p", str(port), "-U", "postgres",
                                "-d", "postgres", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
                               capture_output=True, text=True, timeout=60, env={**os.environ, "PGCLIENTENCODING": "UTF8"})
            assert r.returncode == 0, r.stderr
            return r.stdout

        psql(f"CREATE ROLE scramuser LOGIN PASSWORD '{SCRAM_PASSWORD}'")
        psql(f"SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD '{MD5_PASSWORD}'")
        psql(f"CREATE ROLE pwuser LOGIN PASSWORD '{PLAIN_PASSWORD}'")
        psql("CREATE ROLE trustuser LOGIN")
        psql("CREATE TABLE people (id int, email text, password_hash text, note varchar(200), card bigint,"
             " profile jsonb); GRANT SELECT ON people TO scramuser;"
             "INSERT INTO people VALUES (1, 'alice@example.com', '$2b$12$abcdefghijklmnopqrstuv', "
             "'call +1 415 555 2671', 4111111111111111, '{\"token\": \"abc\", \"mail\": \"bob@example.org\"}')")
        assert psql("SELECT rolpassword LIKE 'md5%' FROM pg_authid WHERE rolname = 'md5user'").strip() == "t"
        yield {"port": port, "psql": psql}
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown of the postmaster we started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


class Client:
    """A blocking test client built only from wire + scram."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.reader = wire.FrameReader("backend")
        self.key: wire.BackendKeyData | None = None
        self.params: dict[str, str] = {}

    def recv(self) -> wire.Message:
        while True:
            frame = self.reader.next_frame()
            if frame is not None:
                return wire.parse_backend(frame)
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.reader.feed(data)

    def recv_frame(self) -> wire.Frame:
        while True:
            frame = self.reader.next_frame()
            if frame is not None:
                return frame
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.reader.feed(data)

    def login(self, user: str, password: str, **auth_kw) -> UpstreamAuthenticator:
        self.sock.sendall(wire.startup_message({"user": user, "database": "postgres"}))
        auth = UpstreamAuthenticator(user, password, **auth_kw)
        while not auth.done:
            reply = auth.handle(self.recv())
            if reply:
                self.sock.sendall(reply)
        while True:
            m = self.recv()
            if isinstance(m, wire.ParameterStatus):
                self.params[m.name] = m.value
            elif isinstance(m, wire.BackendKeyData):
                self.key = m
            elif isinstance(m, wire.ReadyForQuery):
                return auth
            elif isinstance(m, wire.ErrorResponse):
                raise AuthenticationError(m.message, m.code)

    def simple_query(self, sql: str) -> list[wire.Message]:
        self.sock.sendall(wire.query(sql))
        out = []
        while True:
            m = self.recv()
            out.append(m)
            if isinstance(m, wire.ReadyForQuery):
                return out

    def close(self) -> None:
        try:
            self.sock.sendall(wire.terminate())
        finally:
            self.sock.close()


@pytest.fixture
def client(pg):
    c = Client(pg["port"])
    yield c
    c.close()


def test_scram_login_with_saslprep_password(client):
    auth = client.login("scramuser", SCRAM_PASSWORD)
    assert auth.method == "scram-sha-256"
    assert client.params["server_version"].startswith("15")
    assert client.key is not None and len(client.key.key) == 4
    msgs = client.simple_query("SELECT current_user, 1 + 1 AS two")
    desc = next(m for m in msgs if isinstance(m, wire.RowDescription))
    row = next(m for m in msgs if isinstance(m, wire.DataRow))
    assert [f.name for f in desc.fields] == ["current_user", "two"]
    assert [bytes(v) for v in row.values] == [b"scramuser", b"2"]
    assert any(isinstance(m, wire.CommandComplete) and m.tag == "SELECT 1" for m in msgs)


def test_scram_wrong_password_is_rejected_by_server(pg):
    c = Client(pg["port"])
    try:
        with pytest.raises(AuthenticationError) as e:
            c.login("scramuser", "wrong")
        assert e.value.code == "28P01"
    finally:
        c.sock.close()


def test_md5_refused_unless_allowed(pg):
    c = Client(pg["port"])
    try:
        with pytest.raises(AuthenticationError, match="md5"):
            c.login("md5user", MD5_PASSWORD)  # default: SCRAM only, the hash never leaves the proxy
    finally:
        c.sock.close()
    c = Client(pg["port"])
    try:
        assert c.login("md5user", MD5_PASSWORD, allow=("md5", "scram-sha-256")).method == "md5"
        assert any(isinstance(m, wire.DataRow) for m in c.simple_query("SELECT 1"))
    finally:
        c.close()


def test_cleartext_when_allowed(pg):
    c = Client(pg["port"])
    try:
        assert c.login("pwuser", PLAIN_PASSWORD, allow=("password",)).method == "password"
    finally:
        c.close()


def test_trust_login(pg):
    c = Client(pg["port"])
    try:
        assert c.login("trustuser", "unused").method == "trust"
    finally:
        c.close()


def test_ssl_request_declined_then_plain_login(pg):
    c = Client(pg["port"])
    try:
        c.sock.sendall(wire.ssl_request())
        c.reader.expect_encryption_response()
        assert c.recv() == wire.EncryptionResponse(b"N")
        c.login("scramuser", SCRAM_PASSWORD)
    finally:
        c.close()


def test_error_and_notice_parsing(client):
    client.login("scramuser", SCRAM_PASSWORD)
    msgs = client.simple_query("SELECT * FROM no_such_table")
    err = next(m for m in msgs if isinstance(m, wire.ErrorResponse))
    assert err.code == "42P01" and "no_such_table" in err.message and err.severity == "ERROR"
    assert msgs[-1] == wire.ReadyForQuery("I")
    msgs = client.simple_query("DO $$ BEGIN RAISE NOTICE 'hello %', 1; END $$")
    assert any(isinstance(m, wire.NoticeResponse) and m.message == "hello 1" for m in msgs)


def test_extended_protocol_binary_results(client):
    client.login("scramuser", SCRAM_PASSWORD)
    client.sock.sendall(wire.Parse("s1", "SELECT $1::int + 1, 'x'::text", (23,)).encode()
                        + wire.Bind("", "s1", (1,), ((41).to_bytes(4, "big"),), (1,)).encode()
                        + wire.Describe("P", "").encode() + wire.Execute("", 0).encode() + wire.sync())
    msgs = []
    while not isinstance(m := client.recv(), wire.ReadyForQuery):
        msgs.append(m)
    assert [type(m).__name__ for m in msgs] == ["ParseComplete", "BindComplete", "RowDescription", "DataRow",
                                                "CommandComplete"]
    assert [f.format for f in msgs[2].fields] == [1, 1]
    assert bytes(msgs[3].values[0]) == (42).to_bytes(4, "big") and bytes(msgs[3].values[1]) == b"x"


def test_cancel_request_interrupts_a_query(pg, client):
    client.login("scramuser", SCRAM_PASSWORD)
    client.sock.sendall(wire.query("SELECT pg_sleep(30)"))
    time.sleep(0.5)
    with socket.create_connection(("127.0.0.1", pg["port"]), timeout=10) as s:
        s.sendall(wire.cancel_request(client.key.pid, client.key.key))
        s.recv(1)  # the server closes the cancel connection without a reply
    msgs = []
    while not isinstance(m := client.recv(), wire.ReadyForQuery):
        msgs.append(m)
    assert any(isinstance(m, wire.ErrorResponse) and m.code == "57014" for m in msgs)


def test_masking_real_rows(pg, client):
    client.login("scramuser", SCRAM_PASSWORD)
    client.sock.sendall(wire.query("SELECT * FROM people"))
    masker = None
    out: list[bytes] = []
    while True:
        frame = client.recv_frame()
        if frame.type == b"T":
            masker = RowMasker(wire.parse_backend(frame))
        if frame.type == b"D":
            out.append(masker.mask(frame.data) or bytes(frame.data))
        if frame.type == b"Z":
            break
    (row,) = wire.read_messages("backend", b"".join(out))
    values = [None if v is None else bytes(v).decode() for v in row.values]
    assert values[0] == "1"
    assert values[1] == "[masked:email]"
    assert values[2] == "[masked:password]"
    assert values[3] == "call [masked:phone]"
    assert values[4] is None  # a card number in a bigint column: NULL, not a string
    assert values[5] == '{"mail": "[masked:email]", "token": "[masked:token]"}'
    assert masker.counts["email"] == 2


def test_masked_rows_still_decode_in_a_real_client_library(pg):
    """The rewritten bytes must be valid for a client that decodes by type OID (psycopg)."""
    psycopg = pytest.importorskip("psycopg")
    c = Client(pg["port"])
    try:
        c.login("scramuser", SCRAM_PASSWORD)
        msgs = c.simple_query("SELECT profile, card, email FROM people")
    finally:
        c.close()
    desc = next(m for m in msgs if isinstance(m, wire.RowDescription))
    row = next(m for m in msgs if isinstance(m, wire.DataRow))
    masked = wire.read_messages("backend", RowMasker(desc).mask(row.encode()))[0]
    loaders = psycopg.adapt.Transformer()
    loaders.set_loader_types([f.type_oid for f in desc.fields], psycopg.pq.Format.TEXT)
    decoded = loaders.load_sequence([None if v is None else bytes(v) for v in masked.values])
    assert decoded == ({"mail": "[masked:email]", "token": "[masked:token]"}, None, "[masked:email]")


def test_statements_agree_with_what_the_server_runs(pg, client):
    """A CTE-hidden DELETE really deletes; the analyzer must have said so."""
    pg["psql"]("CREATE TABLE scratch (id int); INSERT INTO scratch VALUES (1), (2);"
               "GRANT ALL ON scratch TO scramuser")
    sql = "WITH d AS (DELETE FROM scratch RETURNING *) SELECT count(*) FROM d"
    ops = SqlAnalyzer().analyze(sql)
    assert [(o.action, o.objects, o.risks) for o in ops] == [
        ("read", (), ()), ("delete", ("scratch",), ("delete-without-where",))]
    client.login("scramuser", SCRAM_PASSWORD)
    client.simple_query(sql)
    assert pg["psql"]("SELECT count(*) FROM scratch").strip() == "0"
