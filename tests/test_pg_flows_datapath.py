"""Message flows PostgreSQL accepts, through the full capture path with real clients (libpq through
psycopg, raw wire messages where no driver sends the flow on purpose) against real PostgreSQL 15:
each must behave as it does direct. The servers, roles, policy and instance are
tests/test_postgres_datapath.py's (mask-people masks people.email and .ssn; the IPv6 address
passes the agent's own login through)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import test_postgres_datapath as base
from test_postgres_datapath import EMAILS, REPO, TLS_PW, dsn, psql, py, statements

from lab.testing import SLOWDOWN

# The same servers, roles, policy and instance (module-scoped fixtures: this module gets its own).
globals().update(pg=base.pg, pgtls=base.pgtls, inst=base.inst)

pytestmark = pytest.mark.datapath
UNPRIVILEGED = ["setpriv", "--reuid", "65533", "--regid", "65533", "--clear-groups"]


def py_unprivileged(inst, code: str, **fmt) -> dict:
    """A Python client run as an agent under an ordinary uid (the attacker of the threat model)."""
    src = textwrap.dedent(code).format(**fmt)
    r = inst.agent([*UNPRIVILEGED, sys.executable, "-"], timeout=60 * SLOWDOWN, cwd=REPO, input=src)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"no result: rc={r.returncode} stdout={r.stdout[-2000:]} stderr={r.stderr[-3000:]}") from None


RAW = """
    import json, socket
    from proxy.postgres import wire
    s = socket.create_connection(("{host}", 5432), timeout=20)
    r = wire.FrameReader("backend")
    def until(kind, n=1):
        got = []
        while sum(isinstance(m, kind) for m in got) < n and not any(isinstance(m, wire.ErrorResponse) and m.severity == "FATAL" for m in got):
            data = s.recv(65536)
            if not data:
                got.append("EOF")
                return got
            r.feed(data); got += list(r.messages())
        return got
    def names(msgs):
        return [m if isinstance(m, str) else type(m).__name__ for m in msgs]
    s.sendall(wire.startup_message({{"user": "bot", "database": "postgres"}}))
    until(wire.ReadyForQuery)
"""


def test_extended_copy_in_twice_after_copy_fail_then_a_masked_named_portal(inst, lab, pg):
    # libpq's PQsendQueryParams COPY (Parse/Bind/Describe/Execute/Sync, then CopyData/CopyDone/Sync):
    # the server ignores the Sync sent during COPY-in. The second such COPY used to end the
    # session, and inside a transaction the rows of a masked named portal reached the agent.
    out = py_unprivileged(inst, RAW + """
    def copy_in(data, fail=False):
        s.sendall(wire.Parse("", "copy items (id, name) from stdin", ()).encode() + wire.Bind("", "", (), (), ()).encode()
                  + wire.Describe("P", "").encode() + wire.Execute("", 0).encode() + wire.sync())
        first = until((wire.CopyInResponse, wire.ReadyForQuery))
        if not isinstance(first[-1], wire.CopyInResponse):
            return names(first) + [str(m.fields) for m in first if isinstance(m, wire.ErrorResponse)]
        end = wire.CopyFail("client gave up").encode() if fail else wire.CopyDone().encode()
        s.sendall(wire.CopyData(data).encode() + end + wire.sync())
        return names(first + until(wire.ReadyForQuery))
    res = {{}}
    res["copies"] = [copy_in(b"900\\tone\\n"), copy_in(b"901\\ttwo\\n", fail=True), copy_in(b"902\\tthree\\n")]
    s.sendall(wire.query("begin")); until(wire.ReadyForQuery)
    res["copies"].append(copy_in(b"903\\tfour\\n"))  # then, in the same transaction, a masked named portal
    s.sendall(wire.Parse("st", "select id, email from people order by id", ()).encode()
              + wire.Bind("po", "st", (), (), ()).encode() + wire.Execute("po", 0).encode() + wire.sync())
    got = until(wire.ReadyForQuery)
    res["rows"] = [[bytes(v).decode() for v in m.values] for m in got if isinstance(m, wire.DataRow)]
    res["after"] = names(got)
    s.sendall(wire.query("commit")); until(wire.ReadyForQuery)
    print(json.dumps(res))
    """, host=lab.b.addr4)
    ok = ["ParseComplete", "BindComplete", "NoData", "CopyInResponse", "CommandComplete", "ReadyForQuery"]
    assert out["copies"][0] == ok and out["copies"][2] == ok and out["copies"][3] == ok, out
    assert out["copies"][1][-2:] == ["ErrorResponse", "ReadyForQuery"], out  # CopyFail: the server's error
    assert out["rows"] == [["1", "[masked:email]"], ["2", "[masked:email]"]], out
    assert not any(e in json.dumps(out) for e in EMAILS)
    assert pg.psql("select string_agg(id::text, ',' order by id) from items where id between 900 and 903") == "900,902,903"
    copies = [s for s in statements(inst) if s["summary"].startswith("copy items")]
    assert len(copies) >= 3 and any(s.get("error") for s in copies)
    # the same flow through libpq itself (psycopg's pq layer), twice
    out = py(inst, """
        import json, psycopg
        from psycopg import pq
        with psycopg.connect("{dsn}") as c:
            pgc, res = c.pgconn, []
            for i in (910, 911):
                pgc.send_query_params(b"copy items (id, name) from stdin", None)
                r = pgc.get_result()
                pgc.put_copy_data(b"%d\\tlibpq\\n" % i)
                pgc.put_copy_end()
                r = pgc.get_result()
                res.append(r.command_status.decode())
                assert pgc.get_result() is None
            c.commit()
        print(json.dumps(res))
    """, dsn=dsn(lab))
    assert out == ["COPY 1", "COPY 1"]


def test_a_query_after_a_failed_execute_is_dropped_like_the_server_does(inst, lab, pg):
    out = py(inst, RAW + """
    s.sendall(wire.Parse("", "select 1/(random() * 0)::int", ()).encode() + wire.Bind("", "", (), (), ()).encode()
              + wire.Execute("", 0).encode() + wire.query("insert into items values (920, 'dropped')") + wire.sync())
    first = names(until(wire.ReadyForQuery))
    s.sendall(wire.query("select 3"))
    got = until(wire.ReadyForQuery)
    print(json.dumps({{"first": first, "next": [bytes(m.values[0]).decode() for m in got if isinstance(m, wire.DataRow)]}}))
    """, host=lab.b.addr4)
    assert out["first"] == ["ParseComplete", "BindComplete", "ErrorResponse", "ReadyForQuery"], out
    assert out["next"] == ["3"]
    assert pg.psql("select count(*) from items where id = 920") == "0", "the server dropped the Query, as direct"


def test_libpq_clients_many_parameters_encrypted_cancel_and_binary_copy_under_mask(inst, lab, pg):
    out = py(inst, """
        import json, threading, time, psycopg
        res = {{}}
        with psycopg.connect("{dsn} sslmode=require", autocommit=True) as c:
            n = 40000
            q = "select array_length(array[" + ",".join(["%s"] * n) + "]::int[], 1)"
            res["params"] = c.execute(q, list(range(n))).fetchone()[0]
            errors = []
            def fire():
                time.sleep(0.7 * {slow})
                try:
                    c.cancel_safe(timeout=10 * {slow})
                except Exception as e:
                    errors.append(f"{{type(e).__name__}}: {{e}}")
            threading.Thread(target=fire).start()
            try:
                c.execute(f"select pg_sleep({{5 * {slow}}})")
                res["cancel"] = "completed"
            except psycopg.errors.QueryCanceled:
                res["cancel"] = "canceled"
            time.sleep(0.2)
            res["cancel_errors"] = errors
            try:
                with c.cursor().copy("copy people to stdout (format binary)") as cp:
                    res["binary"] = b"".join(bytes(x) for x in cp).hex()
            except psycopg.Error as e:
                res["binary"] = [e.sqlstate, str(e).splitlines()[0]]
            res["after"] = c.execute("select count(*) from people").fetchone()[0]
        print(json.dumps(res))
    """, dsn=dsn(lab), slow=SLOWDOWN)
    assert out["params"] == 40000
    assert out["cancel"] == "canceled" and out["cancel_errors"] == [], out
    assert out["binary"][0] == "0A000" and "binary COPY" in out["binary"][1], out
    assert out["after"] == 2, "the session goes on"


def test_tls_results_of_every_size_arrive(inst, lab):
    # Records larger than libpq's 8 KB buffer left part of a result inside the client's OpenSSL
    # while psycopg waited on the socket: some sizes never returned. Many sizes, bounded time.
    out = py(inst, """
        import json, psycopg
        sizes = sorted({{int(1.013 ** i) for i in range(900)}} | set(range(8100, 8300, 7)) | set(range(16300, 16500, 11)))
        got = 0
        with psycopg.connect("{dsn} sslmode=require", autocommit=True) as c:
            for n in sizes:
                got += len(c.execute("select repeat('x', %s)", (n,)).fetchone()[0]) == n
        print(json.dumps([len(sizes), got]))
    """, dsn=dsn(lab), timeout=120)
    assert out[0] > 500 and out[1] == out[0]
    # and at the record level, deterministically: no record toward the agent carries more than
    # 8 KB of plaintext (TLS 1.3: 1 content-type byte and a 16-byte tag on top)
    out = py(inst, """
        import json, socket, ssl, struct
        from proxy.postgres import wire
        s = socket.create_connection(("{host}", 5432), timeout=20)
        s.sendall(wire.ssl_request()); assert s.recv(1) == b"S"
        ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        inc, outg = ssl.MemoryBIO(), ssl.MemoryBIO()
        t = ctx.wrap_bio(inc, outg)
        raw, sizes, r, seen = b"", [], wire.FrameReader("backend"), []
        def pump():
            global raw
            data = s.recv(65536)
            assert data
            raw += data
            while len(raw) >= 5 and len(raw) >= 5 + struct.unpack_from("!H", raw, 3)[0]:
                n = struct.unpack_from("!H", raw, 3)[0]
                if raw[0] == 23:
                    sizes.append(n)
                inc.write(raw[:5 + n]); raw = raw[5 + n:]
        while True:
            try:
                t.do_handshake(); break
            except ssl.SSLWantReadError:
                s.sendall(outg.read()); pump()
        s.sendall(outg.read())
        def send(b):
            t.write(b); s.sendall(outg.read())
        def until_ready():
            got = []
            while sum(isinstance(m, wire.ReadyForQuery) for m in got) < 1:
                try:
                    r.feed(t.read(1 << 20)); got += list(r.messages())
                except ssl.SSLWantReadError:
                    pump()
            return got
        send(wire.startup_message({{"user": "bot", "database": "postgres"}})); until_ready()
        send(wire.query("select repeat('x', 300000)")); got = until_ready()
        print(json.dumps({{"max": max(sizes), "rows": sum(isinstance(m, wire.DataRow) for m in got)}}))
    """, host=lab.b.addr4)
    assert out["rows"] == 1 and out["max"] <= 8192 + 17, out


def test_standard_conforming_strings_off_is_followed_and_syntax_errors_are_the_servers(inst, lab, pg):
    out = py(inst, r"""
        import json, psycopg
        from psycopg import sql
        res = {{}}
        with psycopg.connect("{dsn}", autocommit=True) as c:
            c.execute("set standard_conforming_strings to off")
            res["scs"] = c.execute("show standard_conforming_strings").fetchone()[0]
            res["roundtrip"] = all(c.execute(f"select {{sql.quote(chr(i))}}::text").fetchone()[0] == chr(i)
                                   for i in range(1, 256))
            try:
                c.execute("insert into items values (930, 'a\\' or true --')")
                res["plain"] = "ran"
            except psycopg.Error as e:
                res["plain"] = e.sqlstate
            res["after"] = c.execute("select 1").fetchone()[0]
            c.execute("reset standard_conforming_strings")
            try:
                c.execute("selec 1")
            except psycopg.errors.SyntaxError as e:
                res["syntax"] = [e.sqlstate, e.diag.message_primary, e.diag.statement_position]
            try:
                c.execute("select 'x' wat 1")
            except psycopg.errors.SyntaxError as e:
                res["syntax2"] = [e.sqlstate, e.diag.message_primary, e.diag.statement_position]
            res["alive"] = c.execute("select 2").fetchone()[0]
            c.execute("set client_encoding to latin9")  # text in a single-byte encoding is read as such
            try:
                c.pgconn.exec_('select 1 from "foo\u20acbar"'.encode("latin9"))
                res["latin9"] = c.pgconn.error_message.decode("latin9").splitlines()[0]
            except psycopg.Error as e:
                res["latin9"] = str(e)
        print(json.dumps(res))
    """, dsn=dsn(lab))
    assert out["scs"] == "off" and out["roundtrip"] is True, out
    assert out["plain"] == "42501" and out["after"] == 1, out  # refused as a statement, session usable
    assert out["syntax"] == ["42601", 'syntax error at or near "selec"', "1"], out
    assert out["syntax2"] == ["42601", 'syntax error at or near "1"', "16"], out
    assert out["alive"] == 2
    assert out["latin9"] == 'ERROR:  relation "foo\u20acbar" does not exist', out  # the server's own answer
    assert pg.psql("select count(*) from items where id = 930") == "0"
    refused = [e["data"] for e in inst.events("decision") if e["data"]["action"] == "unparseable"]
    assert any(d["summary"] == "selec 1" for d in refused), "the refusal is on record"
    assert any(d["rule"] == "builtin:nonstandard-strings" for d in refused)


def test_pass_through_scram_over_tls_names_the_fix(inst, lab, pgtls):
    # The agent's libpq offers channel binding ('y') over its TLS to the proxy; the server, which
    # offers SCRAM-SHA-256-PLUS over its TLS to the proxy, would refuse that as a downgrade.
    base = "sslmode=require"
    bad = psql(inst, lab, "select 1;", user="app_tls", v6=True, port=5433, conn=base, env={"PGPASSWORD": TLS_PW})
    assert bad.returncode != 0 and "store a credential" in bad.stderr and "channel_binding=disable" in bad.stderr, bad.stderr
    ok = psql(inst, lab, "select current_user;", user="app_tls", v6=True, port=5433,
              conn=base + " channel_binding=disable", env={"PGPASSWORD": TLS_PW})
    assert ok.returncode == 0 and ok.stdout.strip() == "app_tls", ok.stderr
    # sslmode=prefer: libpq retries without TLS after the error, as it does direct
    prefer = psql(inst, lab, "select current_user;", user="app_tls", v6=True, port=5433, conn="sslmode=prefer",
                  env={"PGPASSWORD": TLS_PW})
    assert prefer.returncode == 0 and prefer.stdout.strip() == "app_tls", prefer.stderr
