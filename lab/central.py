"""A central recorder for tests, benchmarks and the demo: a throwaway PostgreSQL cluster
(lab/postgres.py) and `python -m central serve` in a lab host's namespace, init done.

    with Central(lab.b) as rec:
        token = rec.token()                    # il1.… for `interlock join --server rec.url --token …`
        rec.url, rec.ca_sha256, rec.ca_pem     # https://10.231.x.2:8443, its CA
        op = rec.operator("alice")             # Client for the read API (operator certificate)
        rec.psql("select count(*) from records")

Other lab hosts reach it at `url` (the host's lab address); code in this process reaches it
through `in_host(rec.host, fn)`, which runs fn on a thread inside the host's network namespace.
`Client` is a small synchronous HTTPS client (stdlib http.client, real TLS, client certificates)."""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from lab.netns import Host
from lab.postgres import Postgres
from lab.testing import stop_process, wait_listening

CLONE_NEWNET = 0x40000000
RECORDER_PORT = 8443


def in_host(host: Host, fn, *args, **kw):
    """fn(*args, **kw) on a new thread that entered `host`'s network namespace; its result or exception."""
    out: dict = {}

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(host.path, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {host.name}")
        finally:
            os.close(fd)
        try:
            out["value"] = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread
            out["error"] = e

    t = threading.Thread(target=run, name=f"in-{host.name}")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


@dataclass
class Reply:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)


class Client:
    """HTTPS to the recorder with an optional client certificate; call it from inside the recorder's
    namespace (in_host) or from another lab host's."""

    def __init__(self, url: str, ca: Path, cert: Path | None = None, key: Path | None = None, timeout: float = 60):
        rest = url.removeprefix("https://")
        self.host, _, port = rest.rpartition(":")
        self.port, self.timeout = int(port), timeout
        self.ctx = ssl.create_default_context(cafile=str(ca))
        if cert is not None:
            self.ctx.load_cert_chain(str(cert), str(key))

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None) -> Reply:
        conn = http.client.HTTPSConnection(self.host.strip("[]"), self.port, context=self.ctx, timeout=self.timeout)
        try:
            data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=hdrs)
            r = conn.getresponse()
            return Reply(r.status, r.read())
        finally:
            conn.close()

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, body) -> Reply:
        return self.request("POST", path, body)


@dataclass
class JoinedHost:
    """A host joined by `Central.join_host`: its id, a Client with its certificate, its Ed25519 signing key."""

    host_id: str
    client: Client
    signing: object


class Central:
    """PostgreSQL + one recorder (`workers` processes) on `host`, listening on all its addresses."""

    def __init__(self, host: Host, port: int = RECORDER_PORT, workers: int = 1, name: str = "recorder.test",
                 web_config: Path | None = None):
        self.host, self.port, self.workers, self.name = host, port, workers, name
        self.web_config = web_config  # serve the approval page with this config (central/web/config.py)
        self.pg: Postgres | None = None
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None
        self.ca_sha256 = ""

    @property
    def url(self) -> str:
        return f"https://{self.host.addr4}:{self.port}"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def ca_pem(self) -> Path:
        return self.state / "ca.pem"

    @property
    def log(self) -> Path:
        return self.dir / "recorder.log"

    @property
    def dsn(self) -> str:
        """libpq conninfo over the cluster's Unix socket: works from this process and from the host."""
        return self.pg.conninfo()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`python -m central ARGS…` (the `interlock recorder` verbs) against this recorder."""
        r = subprocess.run([sys.executable, "-m", "central", *args], capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise RuntimeError(f"central {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def start(self) -> Central:
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=f"interlock-central-{self.host.name}-"))
            self.pg = Postgres(self.host).start()
            out = self.cli("init", "--json", "--state", str(self.state), "--name", self.name, "--ip", self.host.addr4,
                           "--ip", "127.0.0.1", "--database", self.dsn)
            self.ca_sha256 = json.loads(out.stdout)["ca_sha256"]
            self.start_server()
        except BaseException:
            self.close()
            raise
        return self

    def start_server(self) -> None:
        """(Re)start the recorder process(es) after a stop or kill."""
        with open(self.log, "ab") as log:
            self.proc = self.host.popen([sys.executable, "-m", "central", "serve", "--state", str(self.state), "--database", self.dsn,
                                         "--listen", f"0.0.0.0:{self.port}", "--workers", str(self.workers),
                                         *(["--web", str(self.web_config)] if self.web_config else [])],
                                        stdout=log, stderr=log, stdin=subprocess.DEVNULL, process_group=0)
        wait_listening(self.host, self.port, self.proc, self.log, timeout=60)

    def stop_server(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def kill_server(self) -> None:
        """kill -9 the recorder (its workers too: they share its process group, which only it leads)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def token(self, expires: str = "1h") -> str:
        return json.loads(self.cli("token", "--json", "--state", str(self.state), "--database", self.dsn,
                                   "--expires", expires).stdout)["token"]

    def operator(self, name: str = "operator") -> Client:
        out = self.dir / f"op-{name}"
        self.cli("operator", name, "--state", str(self.state), "--out", str(out))
        return Client(self.url, self.ca_pem, out / "operator.crt", out / "operator.key")

    def join_host(self, name: str = "lab-host") -> JoinedHost:
        """Join a host the way `interlock join` does (CSR + Ed25519 key + token) and return its client."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        from recorder.records import Ed25519PrivateKey, public_key_hex

        key, signing = ec.generate_private_key(ec.SECP256R1()), Ed25519PrivateKey.generate()
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        pem = csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
        body = {"token": self.token(), "csr": pem, "signing_key": public_key_hex(signing), "name": name}
        r = in_host(self.host, Client(self.url, self.ca_pem).post, "/v1/join", body)
        if r.status != 200:
            raise RuntimeError(f"join refused: {r.status} {r.body[:300]!r}")
        got = r.json()
        d = self.dir / "hosts" / got["host_id"]
        d.mkdir(parents=True)
        (d / "tls.crt").write_text(got["cert"])
        (d / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
        return JoinedHost(got["host_id"], Client(self.url, self.ca_pem, d / "tls.crt", d / "tls.key"), signing)

    def psql(self, sql: str) -> str:
        return self.pg.psql(sql)

    def chain(self, host: str):
        """One host's chain as the store holds it: (records in seq order, checkpoints, its registered
        Ed25519 public key), read from PostgreSQL directly, for tests that compare it with the host's."""
        import psycopg

        from recorder import records
        with psycopg.connect(self.dsn) as conn:
            recs = [records.Record(host, s, k, b, bytes(h).hex()) for s, k, b, h in conn.execute(
                "SELECT seq, kind, body, hash FROM records WHERE host_id = %s ORDER BY seq", (host,))]
            cps = [records.Checkpoint(host, s, bytes(h).hex(), a, bytes(g).hex()) for s, h, a, g in conn.execute(
                "SELECT seq, head, at_us, sig FROM checkpoints WHERE host_id = %s", (host,))]
            key = conn.execute("SELECT signing_key FROM hosts WHERE host_id = %s", (host,)).fetchone()[0]
        return recs, cps, records.public_key_from_hex(key)

    def close(self) -> None:
        try:
            self.kill_server() if self.proc is not None and self.workers > 1 else self.stop_server()
        finally:
            if self.pg is not None:
                self.pg.close()
                self.pg = None
            if self.dir is not None:
                import shutil

                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def __enter__(self) -> Central:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
