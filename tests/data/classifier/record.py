"""Re-record the classifier corpus: real clients talking to real local servers, captured as pcap.

Why: the classifier must recognise what actual client software sends (libpq's startup packet,
curl's and OpenSSL's ClientHello, redis-cli's RESP, dig's DNS query, ...), not what we believe they
send. This script makes that traffic on this machine and keeps it small enough to commit.

Run as root from the repo root (Debian 12):

    apt-get install -y tshark redis-server redis-tools mariadb-server mariadb-client dnsutils \
        openssh-server openssh-client openssl curl socat iperf3 postgresql \
        krb5-kdc krb5-admin-server krb5-user
    .venv/bin/pip install pymongo pymysql psycopg[binary] dnspython dpkt
    .venv/bin/python tests/data/classifier/record.py            # all cases
    .venv/bin/python tests/data/classifier/record.py redis_cli   # only cases whose name contains it

Everything happens inside a private network namespace (`unshare --net`, which disappears with the
process): servers listen on its 127.0.0.1 and dumpcap captures its loopback, so no traffic leaves
and nothing else on the host is captured. One pcap per case, each holding only that case's port,
trimmed to the first packets of each flow (classification reads a few KiB at most). manifest.json
lists for every pcap the client, the server, the expected label and, per flow, expected details.
Cases whose tools are missing are skipped and reported; their old pcaps and manifest rows stay.
Servers that cannot be had here (MongoDB) are replaced by a listener that only reads, which is
enough: the client speaks first and its bytes are what is classified."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PY = sys.executable
MAX_PACKETS_PER_FLOW = 16


@dataclass
class Case:
    """One client run against one server, captured into `<name>.pcap`."""

    name: str
    label: str
    server: str
    port: int
    client: str  # human-readable description of the client, for the manifest
    run: Callable[[Path], Any]  # runs the client (blocking, bounded)
    expect: list[dict[str, Any]] = field(default_factory=list)  # per-flow details to check, in SYN order
    needs: tuple[str, ...] = ()
    mtu: int | None = None  # shrink the namespace's loopback MTU so one hello spans TCP segments
    realm: bool = False  # needs the Kerberos realm (port 88 in `missing` when it could not start)


def sh(*argv: str, timeout: float = 20, check: bool = False, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    """Run a client to completion; failures are fine (auth errors etc.), hangs are not."""
    try:
        if "input" not in kw:
            kw["stdin"] = subprocess.DEVNULL
        return subprocess.run(argv, capture_output=True, timeout=timeout, check=check, **kw)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(argv, -1, e.stdout or b"", e.stderr or b"")


class Procs:
    """Servers this script started, ended by PID only."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *argv: str, **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_port(port: int, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


# --- in-process servers for protocols without a packaged server we can run here ---------------

class _ReadOnly(socketserver.BaseRequestHandler):
    """Accept and read until the client gives up: a stand-in MongoDB for the client's first message."""

    def handle(self) -> None:
        self.request.settimeout(3)
        try:
            while self.request.recv(65536):
                pass
        except OSError:
            pass


class _Dns(socketserver.BaseRequestHandler):
    """Answers every DNS-over-TCP query with NXDOMAIN, echoing the question (RFC 1035 §4.1)."""

    def handle(self) -> None:
        self.request.settimeout(3)
        try:
            while True:
                head = self._read(2)
                if not head:
                    return
                msg = self._read(int.from_bytes(head, "big"))
                if len(msg) < 12:
                    return
                qd_end = 12
                while qd_end < len(msg) and msg[qd_end]:
                    qd_end += 1 + msg[qd_end]
                question = msg[12:qd_end + 5]
                flags = 0x8000 | (int.from_bytes(msg[2:4], "big") & 0x7900) | 0x0003  # QR, opcode/RD, NXDOMAIN
                reply = msg[0:2] + flags.to_bytes(2, "big") + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question
                self.request.sendall(len(reply).to_bytes(2, "big") + reply)
        except OSError:
            return

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.request.recv(n - len(buf))
            if not chunk:
                return b""
            buf += chunk
        return buf


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(handler: type[socketserver.BaseRequestHandler], port: int) -> _Server:
    srv = _Server(("127.0.0.1", port), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


# --- clients written in Python (real client libraries) ----------------------------------------

def _pymongo(api: bool) -> None:
    import pymongo
    from pymongo.server_api import ServerApi

    kw: dict[str, Any] = {"serverSelectionTimeoutMS": 1500, "connectTimeoutMS": 1500, "directConnection": True}
    if api:
        kw["server_api"] = ServerApi("1")
    client = pymongo.MongoClient("mongodb://127.0.0.1:27017/", **kw)
    try:
        client.admin.command("ping")
    except Exception:  # noqa: BLE001 - the stand-in server never answers
        pass
    finally:
        client.close()


def _pymysql() -> None:
    import pymysql

    try:
        pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", connect_timeout=5).close()
    except Exception:  # noqa: BLE001
        pass


def _psycopg_cancel() -> None:
    """A query cancelled from another connection: libpq's real CancelRequest."""
    import psycopg

    conn = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres sslmode=disable",
                           application_name="interlock-corpus")
    t = threading.Thread(target=lambda: _swallow(conn.execute, "SELECT pg_sleep(5)"))
    t.start()
    time.sleep(0.5)
    conn.cancel()
    t.join()
    conn.close()


def _psycopg_prefer() -> None:
    import psycopg

    psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres sslmode=prefer").close()


def _swallow(fn: Callable[..., Any], *a: Any) -> None:
    try:
        fn(*a)
    except Exception:  # noqa: BLE001
        pass


def _python_tls() -> None:
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", 8443), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="py.example.test") as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.recv(1024)


def _dnspython() -> None:
    import dns.message
    import dns.query

    q = dns.message.make_query("svc.example.test", "SRV")
    _swallow(dns.query.tcp, q, "127.0.0.1", 3, 5353)


def _smtplib() -> None:
    import smtplib

    with smtplib.SMTP("127.0.0.1", 2525, timeout=5) as s:
        s.sendmail("agent@example.test", ["ops@example.test"], "Subject: corpus\r\n\r\nhello\r\n")


def _silent_reader(port: int) -> Callable[[Path], None]:
    """A client that only listens, so the server's greeting is the first byte on the wire."""
    def run(_: Path) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            try:
                s.recv(4096)
            except OSError:
                pass
            time.sleep(0.3)
    return run


# --- the cases ---------------------------------------------------------------------------------

def cases() -> list[Case]:
    curl = ("curl", "-sS", "-m", "5", "-o", "/dev/null")
    s_client = ("openssl", "s_client", "-connect", "127.0.0.1:8443", "-quiet", "-no_ign_eof")
    ssh = ("ssh", "-p", "2222", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
           "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5")
    psql = ("psql", "-X", "-c", "select 1")
    dig = ("dig", "@127.0.0.1", "-p", "5353", "+tcp", "+tries=1", "+time=3")
    redis = ("redis-cli", "-h", "127.0.0.1", "-p", "6379")
    mysql = ("mariadb", "--no-defaults", "-h", "127.0.0.1", "-P", "3306", "-u", "root", "-e", "select 1")
    pg = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    long_alpn = ",".join(["h2", "http/1.1"] + [f"x-interlock-corpus-{i:02d}" for i in range(40)])
    return [
        Case("http_curl_get", "http", "python http.server", 8080, "curl http GET",
             lambda _: sh(*curl, "http://127.0.0.1:8080/"), [{"method": "GET", "host": "127.0.0.1:8080"}]),
        Case("http_curl_post", "http", "python http.server", 8080, "curl http POST with body",
             lambda _: sh(*curl, "-d", "q=1", "http://localhost:8080/api"), [{"method": "POST"}]),
        Case("http_curl_h2c_upgrade", "http", "python http.server", 8080, "curl --http2 (h2c upgrade)",
             lambda _: sh(*curl, "--http2", "http://127.0.0.1:8080/"), [{"upgrade": "h2c"}]),
        Case("http_urllib", "http", "python http.server", 8080, "python urllib",
             lambda _: sh(PY, "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/').read()")),
        Case("http2_prior_knowledge", "http2", "python http.server", 8080, "curl --http2-prior-knowledge",
             lambda _: sh(*curl, "--http2-prior-knowledge", "http://127.0.0.1:8080/")),
        Case("tls_curl_localhost", "tls", "openssl s_server", 8443, "curl -k https://localhost",
             lambda _: sh(*curl, "-k", "https://localhost:8443/"), [{"sni": "localhost", "alpn": ["h2", "http/1.1"]}]),
        Case("tls_curl_resolve", "tls", "openssl s_server", 8443, "curl -k --http1.1 --resolve api.example.test",
             lambda _: sh(*curl, "-k", "--http1.1", "--resolve", "api.example.test:8443:127.0.0.1",
                          "https://api.example.test:8443/"), [{"sni": "api.example.test", "alpn": ["http/1.1"]}]),
        Case("tls_s_client_alpn", "tls", "openssl s_server", 8443,
             "openssl s_client -servername svc.example.test -alpn h2,http/1.1",
             lambda _: sh(*s_client, "-servername", "svc.example.test", "-alpn", "h2,http/1.1"),
             [{"sni": "svc.example.test", "alpn": ["h2", "http/1.1"]}]),
        Case("tls_s_client_tls12", "tls", "openssl s_server", 8443, "openssl s_client -tls1_2 -servername",
             lambda _: sh(*s_client, "-tls1_2", "-servername", "legacy.example.test"),
             [{"sni": "legacy.example.test"}]),
        Case("tls_s_client_split_records", "tls", "openssl s_server", 8443,
             "openssl s_client -max_send_frag 512 with a long ALPN list (hello over several TLS records)",
             lambda _: sh(*s_client, "-max_send_frag", "512", "-servername", "split.example.test",
                          "-alpn", long_alpn),
             [{"sni": "split.example.test", "records_min": 2}]),
        Case("tls_curl_small_mtu", "tls", "openssl s_server", 8443,
             "curl -k with loopback MTU 256, no GSO (hello over several TCP segments)",
             lambda _: sh(*curl, "-k", "--resolve", "mtu.example.test:8443:127.0.0.1", "https://mtu.example.test:8443/"),
             [{"sni": "mtu.example.test", "segments_min": 2}], mtu=256),
        Case("tls_python_ssl", "tls", "openssl s_server", 8443, "python ssl, server_hostname=py.example.test",
             lambda _: _python_tls(), [{"sni": "py.example.test", "alpn": ["http/1.1"]}]),
        Case("pg_psql_plain", "postgres", "postgres 15", 5432, "psql sslmode=disable",
             lambda _: sh(*psql, f"{pg} sslmode=disable application_name=corpus"),
             [{"message": "startup", "user": "postgres"}], needs=("psql",)),
        Case("pg_psql_ssl", "postgres", "postgres 15 (ssl=on)", 5432, "psql sslmode=require",
             lambda _: sh(*psql, f"{pg} sslmode=require"), [{"message": "ssl_request"}], needs=("psql",)),
        Case("pg_psql_gssenc", "postgres", "postgres 15, client holding a Kerberos ticket", 5432,
             "psql gssencmode=prefer (GSSENCRequest, then falls back)",
             lambda _: sh(*psql, f"{pg} gssencmode=prefer sslmode=disable", env=KRB_ENV),
             [{"message": "gssenc_request"}], needs=("psql",), realm=True),
        Case("pg_psycopg_prefer", "postgres", "postgres 15 (ssl=on)", 5432, "psycopg 3 sslmode=prefer",
             lambda _: _psycopg_prefer(), [{"message": "ssl_request"}]),
        Case("pg_psycopg_cancel", "postgres", "postgres 15", 5432, "psycopg 3 conn.cancel() during pg_sleep",
             lambda _: _psycopg_cancel(), [{"message": "startup", "application_name": "interlock-corpus"}, {"message": "cancel_request"}]),
        Case("pg_isready", "postgres", "postgres 15", 5432, "pg_isready",
             lambda _: sh("pg_isready", "-h", "127.0.0.1", "-p", "5432"), [{"message": "ssl_request"}],
             needs=("pg_isready",)),
        Case("redis_cli_ping", "redis", "redis-server 7", 6379, "redis-cli PING",
             lambda _: sh(*redis, "PING"), [{"style": "resp", "command": "PING"}], needs=("redis-cli",)),
        Case("redis_cli_set", "redis", "redis-server 7", 6379, "redis-cli SET",
             lambda _: sh(*redis, "SET", "corpus:key", "value"), [{"command": "SET"}], needs=("redis-cli",)),
        Case("redis_cli_resp3", "redis", "redis-server 7", 6379, "redis-cli -3 INFO server",
             lambda _: sh(*redis, "-3", "INFO", "server"), needs=("redis-cli",)),
        Case("redis_inline_socat", "redis", "redis-server 7", 6379, "inline commands typed through socat",
             lambda _: sh("socat", "-", "TCP:127.0.0.1:6379", input=b"PING\r\nQUIT\r\n"),
             [{"style": "inline", "command": "PING"}], needs=("socat",)),
        Case("mongo_pymongo_default", "mongodb", "read-only stand-in listener", 27017,
             "pymongo, no server API (OP_MSG ismaster)", lambda _: _pymongo(False),
             [{"opcode": "OP_MSG", "command": "ismaster"}] * 2),
        Case("mongo_pymongo_api1", "mongodb", "read-only stand-in listener", 27017, "pymongo server_api=1 (OP_MSG)",
             lambda _: _pymongo(True), [{"opcode": "OP_MSG", "command": "hello", "db": "admin"}]),
        Case("dns_dig_a", "dns", "in-script DNS-over-TCP responder", 5353, "dig +tcp A",
             lambda _: sh(*dig, "www.example.test", "A"), [{"qname": "www.example.test.", "qtype": "A"}],
             needs=("dig",)),
        Case("dns_dig_aaaa_noedns", "dns", "in-script DNS-over-TCP responder", 5353, "dig +tcp +noedns AAAA",
             lambda _: sh(*dig, "+noedns", "api.example.test", "AAAA"), [{"qtype": "AAAA"}], needs=("dig",)),
        Case("dns_dig_txt", "dns", "in-script DNS-over-TCP responder", 5353, "dig +tcp TXT",
             lambda _: sh(*dig, "example.test", "TXT"), [{"qtype": "TXT"}], needs=("dig",)),
        Case("dns_dnspython", "dns", "in-script DNS-over-TCP responder", 5353, "dnspython dns.query.tcp SRV",
             lambda _: _dnspython(), [{"qtype": "SRV"}]),
        Case("ssh_client", "ssh", "OpenSSH sshd", 2222, "ssh (BatchMode, auth fails)",
             lambda _: sh(*ssh, "nobody@127.0.0.1", "true"), needs=("ssh",)),
        Case("ssh_keyscan", "ssh", "OpenSSH sshd", 2222, "ssh-keyscan",
             lambda _: sh("ssh-keyscan", "-p", "2222", "127.0.0.1"), needs=("ssh-keyscan",)),
        Case("ssh_server_first", "ssh", "OpenSSH sshd", 2222, "silent client: server banner decides",
             _silent_reader(2222)),
        Case("mysql_mariadb_cli", "mysql", "mariadbd 10.11", 3306, "mariadb CLI (server-first)",
             lambda _: sh(*mysql), needs=("mariadb",)),
        Case("mysql_pymysql", "mysql", "mariadbd 10.11", 3306, "pymysql (server-first)", lambda _: _pymysql()),
        Case("smtp_curl", "smtp", "python smtpd DebuggingServer", 2525, "curl smtp:// (server-first)",
             lambda d: sh(*curl, "smtp://127.0.0.1:2525", "--mail-from", "agent@example.test", "--mail-rcpt",
                          "ops@example.test", "-T", str(d / "mail.txt"))),
        Case("smtp_smtplib", "smtp", "python smtpd DebuggingServer", 2525, "python smtplib (server-first)",
             lambda _: _swallow(_smtplib)),
        Case("tcp_iperf3", "tcp", "iperf3 -s", 5201, "iperf3 -c (not a protocol we know: plain TCP)",
             lambda _: sh("iperf3", "-c", "127.0.0.1", "-p", "5201", "-t", "1", "-l", "1K", "-b", "1M"),
             needs=("iperf3",)),
    ]


# --- servers -------------------------------------------------------------------------------------

KRB_ENV: dict[str, str] = {}


def start_kdc(work: Path, procs: Procs) -> str | None:
    """A throwaway MIT Kerberos realm, so that libpq holds a ticket and opens with a GSSENCRequest.

    Returns why it could not start, or None. The client environment lands in KRB_ENV."""
    if not all(shutil.which(t) for t in ("krb5kdc", "kdb5_util", "kadmin.local", "kinit")):
        return "krb5-kdc / krb5-admin-server / krb5-user not installed"
    krb = work / "krb"
    krb.mkdir()
    realm = "INTERLOCK.TEST"
    (krb / "krb5.conf").write_text(f"[libdefaults]\n default_realm = {realm}\n dns_lookup_kdc = false\n"
                                   f"[realms]\n {realm} = {{\n  kdc = 127.0.0.1:8888\n }}\n")
    (krb / "kdc.conf").write_text(f"[realms]\n {realm} = {{\n  database_name = {krb}/principal\n"
                                  f"  key_stash_file = {krb}/stash\n  kdc_ports = 8888\n  kdc_tcp_ports = 8888\n }}\n")
    env = dict(os.environ, KRB5_CONFIG=str(krb / "krb5.conf"), KRB5_KDC_PROFILE=str(krb / "kdc.conf"),
               KRB5CCNAME=f"FILE:{krb}/ccache")
    sh("kdb5_util", "create", "-s", "-r", realm, "-P", "corpus-master", env=env, check=True)
    sh("kadmin.local", "-q", "addprinc -pw corpus-pw agent", env=env, check=True)
    procs.start("krb5kdc", "-n", env=env)
    wait_port(8888)
    sh("kinit", "agent", input=b"corpus-pw\n", env=env, check=True)
    KRB_ENV.update(env)
    return None


def start_servers(work: Path, procs: Procs) -> dict[int, str]:
    """Start every server we can; returns port → reason for each that could not start."""
    missing: dict[int, str] = {}
    (work / "www").mkdir()
    (work / "www" / "index.html").write_text("corpus\n")
    (work / "mail.txt").write_text("Subject: corpus\r\n\r\nhello\r\n")
    procs.start(PY, "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory", str(work / "www"))

    key, cert = work / "key.pem", work / "cert.pem"
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
       "-keyout", str(key), "-out", str(cert), check=True)
    procs.start("openssl", "s_server", "-accept", "8443", "-cert", str(cert), "-key", str(key), "-www")

    pg_bin = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if pg_bin:
        bindir = pg_bin[-1].parent
        pgdata = work / "pg"
        pgdata.mkdir()
        shutil.chown(pgdata, "postgres", "postgres")
        as_pg = ("runuser", "-u", "postgres", "--")
        sh(*as_pg, str(bindir / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust", check=True)
        for f in (key, cert):
            shutil.copy(f, pgdata / f.name)
            shutil.chown(pgdata / f.name, "postgres", "postgres")
            os.chmod(pgdata / f.name, 0o600)
        procs.start(*as_pg, str(bindir / "postgres"), "-D", str(pgdata), "-k", str(pgdata), "-p", "5432",
                    "-c", "listen_addresses=127.0.0.1", "-c", "ssl=on", "-c", "ssl_cert_file=cert.pem",
                    "-c", "ssl_key_file=key.pem")
    else:
        missing[5432] = "no PostgreSQL server binaries"

    if shutil.which("redis-server"):
        procs.start("redis-server", "--port", "6379", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", str(work))
    else:
        missing[6379] = "redis-server not installed"

    if shutil.which("mariadbd") or Path("/usr/sbin/mariadbd").exists():
        mdata = work / "mysql"
        sh("mariadb-install-db", "--no-defaults", f"--datadir={mdata}", "--user=root", "--skip-test-db",
           timeout=120, check=True)
        procs.start("/usr/sbin/mariadbd", "--no-defaults", f"--datadir={mdata}", "--user=root", "--port=3306",
                    "--bind-address=127.0.0.1", f"--socket={mdata}/sock", "--skip-grant-tables",
                    f"--pid-file={mdata}/pid", "--skip-log-error")
    else:
        missing[3306] = "mariadb-server not installed"

    if Path("/usr/sbin/sshd").exists():
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "hostkey"), check=True)
        cfg = work / "sshd_config"
        cfg.write_text(f"Port 2222\nListenAddress 127.0.0.1\nHostKey {work / 'hostkey'}\nPidFile {work / 'sshd.pid'}\n"
                       "UsePAM no\nStrictModes no\nPasswordAuthentication no\n")
        procs.start("/usr/sbin/sshd", "-D", "-e", "-f", str(cfg))
    else:
        missing[2222] = "openssh-server not installed"

    why = start_kdc(work, procs)
    if why:
        missing[88] = why
    procs.start(PY, "-W", "ignore", "-m", "smtpd", "-n", "-c", "DebuggingServer", "127.0.0.1:2525")
    if shutil.which("iperf3"):
        procs.start("iperf3", "-s", "-p", "5201", "-B", "127.0.0.1")
    serve(_ReadOnly, 27017)
    serve(_Dns, 5353)

    for port in (8080, 8443, 5432, 6379, 3306, 2222, 2525, 5201, 27017, 5353):
        if port not in missing:
            try:
                wait_port(port, 60)
            except RuntimeError as e:
                missing[port] = str(e)
    return missing


# --- capture and trimming ------------------------------------------------------------------------

def capture(case: Case, work: Path, out: Path) -> int:
    """Capture `case` into `out`; returns the number of TCP flows seen."""
    raw = work / f"{case.name}.raw.pcap"
    dump = subprocess.Popen(["dumpcap", "-i", "lo", "-f", f"tcp port {case.port}", "-w", str(raw), "-P", "-q"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert dump.stderr is not None
        line = dump.stderr.readline()  # "Capturing on 'Loopback: lo'" once the filter is live
        if b"Capturing" not in line:
            raise RuntimeError(f"dumpcap: {line!r}")
        time.sleep(0.3)
        if case.mtu:
            # Loopback hands whole GSO super-packets to the capture: one segment per packet makes
            # the capture show what a real network would carry at this MTU.
            sh("ip", "link", "set", "lo", "mtu", str(case.mtu), "gso_max_segs", "1", check=True)
        try:
            case.run(work)
        finally:
            if case.mtu:
                sh("ip", "link", "set", "lo", "mtu", "65536", "gso_max_segs", "65535", check=True)
        time.sleep(0.5)
    finally:
        dump.send_signal(signal.SIGINT)
        try:
            dump.wait(10)
        except subprocess.TimeoutExpired:
            dump.kill()
            dump.wait()
    return trim(raw, out)


def trim(src: Path, dst: Path) -> int:
    """Keep the handshake and the first MAX_PACKETS_PER_FLOW packets of each flow."""
    import dpkt

    kept: dict[tuple[Any, ...], int] = {}
    with src.open("rb") as fi, dst.open("wb") as fo:
        reader = dpkt.pcap.Reader(fi)
        writer = dpkt.pcap.Writer(fo, snaplen=65535, linktype=reader.datalink())
        for ts, buf in reader:
            ip = _ip_of(buf, reader.datalink())
            if ip is None or not isinstance(ip.data, dpkt.tcp.TCP):
                continue
            tcp = ip.data
            key = tuple(sorted([(bytes(ip.src), tcp.sport), (bytes(ip.dst), tcp.dport)]))
            if key not in kept and not tcp.flags & dpkt.tcp.TH_SYN:
                continue  # a flow whose start we did not see
            kept[key] = kept.get(key, 0) + 1
            if kept[key] <= MAX_PACKETS_PER_FLOW:
                writer.writepkt(buf, ts)
    src.unlink()
    return len(kept)


def _ip_of(buf: bytes, linktype: int) -> Any:
    import dpkt

    if linktype == dpkt.pcap.DLT_EN10MB:
        return dpkt.ethernet.Ethernet(buf).data
    if linktype == dpkt.pcap.DLT_LINUX_SLL:
        return dpkt.sll.SLL(buf).data
    if linktype == dpkt.pcap.DLT_NULL:
        return dpkt.loopback.Loopback(buf).data
    return None


# --- main ----------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("record.py: run as root (network namespace, dumpcap, postgres via runuser)", file=sys.stderr)
        return 2
    if os.environ.get("INTERLOCK_CORPUS_NETNS") != "1":
        env = dict(os.environ, INTERLOCK_CORPUS_NETNS="1")
        return subprocess.call(["unshare", "--net", "--", PY, str(Path(__file__).resolve()), *argv], env=env)
    sh("ip", "link", "set", "lo", "up", check=True)

    manifest_path = HERE / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"cases": []}
    rows = {row["file"]: row for row in manifest["cases"]}
    selected = [c for c in cases() if not argv or any(a in c.name for a in argv)]
    skipped: list[str] = []
    procs = Procs()
    work = Path(tempfile.mkdtemp(prefix="interlock-corpus-"))
    os.chmod(work, 0o755)
    try:
        missing = start_servers(work, procs)
        time.sleep(1)
        for case in selected:
            tools = [t for t in case.needs if not shutil.which(t)]
            if tools or case.port in missing or (case.realm and 88 in missing):
                skipped.append(f"{case.name}: {', '.join(tools) or missing.get(case.port) or missing[88]}")
                continue
            out = HERE / f"{case.name}.pcap"
            flows = capture(case, work, out)
            if flows == 0:
                skipped.append(f"{case.name}: no flow captured")
                out.unlink()
                continue
            rows[out.name] = {"file": out.name, "label": case.label, "client": case.client, "server": case.server,
                              "port": case.port, "flows": flows, "expect": case.expect}
            print(f"{case.name}: {flows} flow(s), {out.stat().st_size} bytes")
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    manifest = {"about": "Real client traffic recorded by record.py in a private network namespace; "
                         "label = expected Verdict.protocol, expect = details per flow in SYN order.",
                "cases": sorted(rows.values(), key=lambda r: r["file"])}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    for s in skipped:
        print("skipped", s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
