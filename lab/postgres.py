"""A throwaway PostgreSQL 15 server on a lab host, for the benchmarks, the tests and the demo.

The cluster lives in a temp dir owned by `postgres` (the server refuses to run as root), listens on
loopback and on the host's lab addresses (IPv4 and IPv6) so clients on the other host can reach it,
trusts the lab subnets and loopback (no passwords to manage), and trades durability for speed:
nothing here needs to survive a crash. Its Unix socket goes into the temp dir, so several servers
on different lab hosts never collide on /var/run/postgresql.

    with Postgres(lab.b) as pg:
        pg.psql("select 1")
        dsn = pg.conninfo(lab.b.addr4)
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from lab.netns import Host

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"

# Durability off: a lab cluster is thrown away, and fsync would make benchmarks measure the disk.
FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "256MB",
    "max_connections": "200",
    "logging_collector": "off",
}


class PostgresError(RuntimeError):
    pass


class Postgres:
    """initdb + postgres in `host`; `start()` returns once it accepts connections.

    `stop()` shuts the server down (fast mode, then SIGKILL, only the PID started here);
    `close()` also removes the temp dir. Both are safe to call twice and after a failed start."""

    def __init__(self, host: Host, port: int = 5432, settings: dict[str, str] | None = None,
                 bindir: Path = PG_BIN, hba: list[str] | None = None):
        self.host = host
        self.port = port
        self.hba = hba or []  # pg_hba.conf lines checked before the trust rules (password roles)
        self.bindir = bindir
        self.settings = {**FAST_SETTINGS, **(settings or {})}
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    # ---- paths and connection strings ------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self._dir

    @property
    def log(self) -> Path:
        return self._dir / "postgres.log"

    @property
    def _dir(self) -> Path:
        if self.dir is None:
            raise PostgresError("not started")
        return self.dir

    def conninfo(self, addr: str | None = None, dbname: str = "postgres") -> str:
        """A libpq conninfo string; addr None means the Unix socket (from the server's host)."""
        host = addr if addr is not None else str(self.socket_dir)
        return f"host={host} port={self.port} user={PG_USER} dbname={dbname}"

    def client_args(self, addr: str | None = None) -> list[str]:
        """-h/-p/-U for psql, pgbench and friends."""
        host = addr if addr is not None else str(self.socket_dir)
        return ["-h", host, "-p", str(self.port), "-U", PG_USER]

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> Postgres:
        if self.proc is not None:
            return self
        try:
            self._initdb()
            self._launch()
            self._wait_ready(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _as_postgres(self, cmd: list[str]) -> list[str]:
        # setpriv execs in place (runuser would fork under PAM), so the PID we hold is the server's.
        return ["setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups", "--", *cmd]

    def _initdb(self) -> None:
        pw = pwd.getpwnam(PG_USER)
        self.dir = Path(tempfile.mkdtemp(prefix=f"interlock-pg-{self.host.name}-"))
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        r = self.host.run(self._as_postgres([str(self.bindir / "initdb"), "-D", str(self.data_dir),
                                             "-U", PG_USER, "--auth=trust", "-E", "UTF8",
                                             "--locale=C", "--no-sync"]),
                          cwd=self.dir, timeout=120)
        if r.returncode != 0:
            raise PostgresError(f"initdb failed: {r.stderr[-2000:]}")
        with open(self.data_dir / "pg_hba.conf", "w") as f:
            f.write(self._hba())

    def _hba(self) -> str:
        """Trust loopback and the lab subnets; anything else is rejected."""
        nets = ["127.0.0.1/32", "::1/128",
                str(ipaddress.ip_interface(f"{self.host.addr4}/24").network),
                str(ipaddress.ip_interface(f"{self.host.addr6}/64").network)]
        lines = ["local all all trust", *self.hba] + [f"host all all {n} trust" for n in nets]
        return "\n".join(lines) + "\n"

    def _launch(self) -> None:
        listen = ",".join(["127.0.0.1", "::1", self.host.addr4, self.host.addr6])
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
               "-k", str(self.socket_dir), "-c", f"listen_addresses={listen}"]
        for key, value in self.settings.items():
            cmd += ["-c", f"{key}={value}"]
        # Its own process group: a terminal Ctrl-C goes to the owner, which then stops the server
        # in order, instead of the server shutting down under a test or benchmark still using it.
        with open(self.log, "ab") as log:
            self.proc = self.host.popen(self._as_postgres(cmd), stdout=log, stderr=log,
                                        stdin=subprocess.DEVNULL, cwd=self.dir, process_group=0)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PostgresError(f"postgres exited {self.proc.returncode}: {self._log_tail()}")
            r = self.host.run([str(self.bindir / "pg_isready"), "-q", *self.client_args("127.0.0.1")],
                              timeout=10)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise PostgresError(f"postgres not ready after {timeout}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def psql(self, sql: str, addr: str | None = None, timeout: float = 60) -> str:
        """Run SQL with psql on the server's host; its unaligned output, or PostgresError."""
        r = self.host.run([str(self.bindir / "psql"), *self.client_args(addr), "-d", "postgres",
                           "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql], timeout=timeout)
        if r.returncode != 0:
            raise PostgresError(f"psql failed: {r.stderr.strip()}")
        return r.stdout.strip()

    def stop(self, timeout: float = 30) -> None:
        """Fast shutdown (SIGINT: abort transactions, then exit), SIGKILL if it hangs."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def through_tracker(tracker, data: bytes) -> bytes:
    """Server bytes run through a Splitter and `tracker` the way the PostgreSQL handler runs them:
    what the agent would receive (for the sans-IO tests of proxy/postgres/tracker.py)."""
    from proxy.postgres.stream import RAW, Splitter

    s = Splitter("backend")
    s.feed(data)
    out = b""
    while True:
        s.stream = tracker.stream
        seg = s.next()
        if seg is None:
            return out
        kind, view = seg
        r = view if kind == RAW else tracker.server(kind, view)
        out += bytes(r) if r is not None else b""
