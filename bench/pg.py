"""PostgreSQL through Interlock against the direct path, haproxy and pgbouncer: `bench.run --only pg`.

The PostgreSQL 15 server on host b (bench.run starts it: pgbench scale 10, fsync off) plus a
2M-row table for COPY. On host a, four paths:

  direct     the client talks to the server's address
  haproxy    bench.run's haproxy (mode tcp) on a's loopback
  pgbouncer  pgbouncer on a's loopback (session pooling, trust auth), run as the postgres user
  interlock  the client enrolled (`interlock run`), the server's real address: captured by the
             cgroup hooks; the proxy parses every statement, judges it against a policy (the
             rules of the embedded default for SQL, plus a masking rule for a table the
             benchmark does not read) and records it

Every client runs with PGSSLMODE=disable: the lab server has no TLS, and haproxy and pgbouncer
would answer SSLRequest 'N' anyway, while Interlock answers 'S' and terminates TLS (see
docs/ARCHITECTURE.md); so all four compare the same plaintext protocol.

Measures: pgbench -S in the simple and the extended protocol, 1 and 8 clients (tps); COPY of
2,000,000 rows out through psql (rows/s); and the resident memory each proxy adds per idle
connection, with 500 psycopg connections open through it."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.cpu import cpu_figures
from lab.instance import Instance
from lab.postgres import PG_USER, Postgres
from lab.testing import stop_process, wait_listening

REPO = Path(__file__).resolve().parent.parent
PATHS = ("direct", "haproxy", "pgbouncer", "interlock")
PORT = 5432
PGBOUNCER_PORT = 26432
PROXY_PORT, DNS_PORT = 15003, 15055  # an instance of its own, next to bench.run's and bench.web's
AGENT = "bench-pg"
COPY_ROWS = 2_000_000
IDLE_CONNECTIONS = 500

POLICY = """\
targets:
  bench-db: {{address: "{addr}", port: {port}, protocol: postgres}}
rules:
  - name: no-server-side-files
    risk: [server-file-access, program-execution]
    decision: deny
  - name: unparseable-sql
    operation: unparseable
    decision: deny
  - name: hold-destructive
    risk: [drop, truncate, delete-without-where, update-without-where, privilege-change]
    decision: approve
  - name: mask-people
    operation: read
    object: [people, public.people]
    decision: mask
    mask: [email, phone, ssn]
default: allow
"""

# Opens N connections through the path it is given, says so, and holds them until stdin closes.
IDLE_CLIENT = """\
import sys, psycopg
conns = [psycopg.connect(sys.argv[1], autocommit=True) for _ in range(int(sys.argv[2]))]
print("open", len(conns), flush=True)
sys.stdin.read()
"""


@dataclass(frozen=True)
class PgBench:
    key: str
    label: str
    mode: str  # pgbench -M
    clients: int


BENCHMARKS = (
    PgBench("simple_c1", "pgbench -S simple, 1 client", "simple", 1),
    PgBench("simple_c8", "pgbench -S simple, 8 clients", "simple", 8),
    PgBench("extended_c1", "pgbench -S extended, 1 client", "extended", 1),
    PgBench("extended_c8", "pgbench -S extended, 8 clients", "extended", 8),
)


def parse_pgbench(out: str) -> tuple[float, int, dict]:
    tps = re.search(r"^tps = ([\d.]+)", out, re.M)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if not tps or not done:
        raise ValueError(f"no tps in pgbench output: {out[-500:]}")
    if failed and int(failed.group(1)):
        raise ValueError(f"{failed.group(1)} failed transactions")
    lat = re.search(r"latency average = ([\d.]+) ms", out)
    return float(tps.group(1)), int(done.group(1)), {"latency_ms": float(lat.group(1)) if lat else None}


def rss_kb(pid: int) -> int:
    """Resident kB of a process; for an Interlock proxy worker, of all its daemon's workers together."""
    from bench.run import proxy_group  # bench.run imports this module

    total = 0
    for p in proxy_group(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                break
        else:
            raise RuntimeError(f"no VmRSS for {p}")
    return total


class Pg:
    """pgbouncer, a 2M-row table and an Interlock instance with a SQL policy, for bench.run's pg group."""

    def __init__(self, stack: contextlib.ExitStack, a, b, tmp: Path, pg: Postgres, haproxy: tuple[int, int],
                 seconds: float, warmup: float, cpu_seconds):
        self.stack, self.a, self.b, self.tmp, self.pg = stack, a, b, tmp, pg
        self.haproxy_port, self.seconds, self.warmup = haproxy[0], seconds, warmup
        self.cpu = cpu_seconds  # bench.run's, which imports this module
        self.pids: dict[str, int] = {"haproxy": haproxy[1]}
        self.inst: Instance | None = None
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "PGSSLMODE": "disable"}

    def setup(self) -> None:
        print(f"  COPY table of {COPY_ROWS:,} rows ...", flush=True)
        self.pg.psql(f"CREATE TABLE copy_rows AS SELECT g AS id, md5(g::text) AS hash, g % 1000 AS bucket,"
                     f" now() AS at FROM generate_series(1, {COPY_ROWS}) g", timeout=300)
        self.pg.psql("VACUUM ANALYZE copy_rows")
        self._pgbouncer()
        policy = self.tmp / "pg-policy.yaml"
        policy.write_text(POLICY.format(addr=self.b.addr4, port=PORT))
        self.inst = Instance(self.a, f"benchpg{os.getpid() % 100000}", proxy_port=PROXY_PORT, dns_port=DNS_PORT,
                             policy=str(policy))
        self.stack.callback(self.inst.close)
        self.inst.start()

    def _pgbouncer(self) -> None:
        pw = pwd.getpwnam(PG_USER)
        # its own directory: pgbouncer runs as postgres, which cannot enter the run's 0700 temp dir
        d = Path(tempfile.mkdtemp(prefix="interlock-bench-pgbouncer-"))
        self.stack.callback(shutil.rmtree, d, True)
        (d / "userlist.txt").write_text(f'"{PG_USER}" ""\n')
        (d / "pgbouncer.ini").write_text("\n".join([
            "[databases]", f"postgres = host={self.b.addr4} port={PORT} dbname=postgres",
            "[pgbouncer]", "listen_addr = 127.0.0.1", f"listen_port = {PGBOUNCER_PORT}", "unix_socket_dir =",
            "auth_type = trust", f"auth_file = {d / 'userlist.txt'}", "pool_mode = session",
            "default_pool_size = 20", "max_client_conn = 2000", "ignore_startup_parameters = extra_float_digits",
            f"logfile = {d / 'pgbouncer.log'}", ""]))
        for f in (d, d / "userlist.txt", d / "pgbouncer.ini"):
            os.chown(f, pw.pw_uid, pw.pw_gid)
        log = open(d / "stderr.log", "ab")
        self.stack.callback(log.close)
        # pgbouncer refuses to run as root; setpriv execs in place, so the PID is pgbouncer's.
        p = self.a.popen(["setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups", "--",
                          "pgbouncer", str(d / "pgbouncer.ini")], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.stack.callback(stop_process, p)
        wait_listening(self.a, PGBOUNCER_PORT, p, d / "stderr.log")
        self.pids["pgbouncer"] = p.pid

    # ---- paths -------------------------------------------------------------------------------

    def target(self, path: str) -> tuple[str, int]:
        return {"haproxy": ("127.0.0.1", self.haproxy_port), "pgbouncer": ("127.0.0.1", PGBOUNCER_PORT)}.get(
            path, (self.b.addr4, PORT))

    def proxy_pid(self, path: str) -> int | None:
        if path == "interlock":
            return int(self.inst.status()["proxy_pid"]) if self.inst else None
        return self.pids.get(path)

    def run_client(self, path: str, cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
        kw = {"timeout": timeout, "cwd": REPO, "env": self.env, **kw}
        if path == "interlock":
            return self.inst.agent(cmd, agent=AGENT, **kw)
        return self.a.run(cmd, **kw)

    def recorded(self, since: float) -> int:
        """Statements the Interlock instance recorded since `since`: proof the client was captured."""
        db = self.inst.state_dir / "recorder.db"
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
            return conn.execute("SELECT count(*) FROM events WHERE kind = 'statement' AND at >= ?", (since,)).fetchone()[0]

    def _timed(self, path: str, cmd: list[str], seconds: float, ops_of) -> dict:
        pid = self.proxy_pid(path)
        cpu0, since, t0 = (self.cpu(pid) if pid else None), time.time(), time.monotonic()
        r = self.run_client(path, cmd, timeout=seconds + 300)
        wall = time.monotonic() - t0
        cpu1 = self.cpu(pid) if pid else None
        if r.returncode != 0:
            raise RuntimeError(f"{cmd[0]} via {path} failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}")
        out = ops_of(r.stdout, wall)
        if cpu0 is not None and cpu1 is not None:
            out.update(cpu_figures(cpu1 - cpu0, wall, out["ops"]))
        if path == "interlock":
            time.sleep(0.5)  # the last group commit
            out["recorded_statements"] = self.recorded(since)
            if not out["recorded_statements"]:
                raise RuntimeError("Interlock recorded no statement: the client was not captured")
        return out

    def pgbench(self, b: PgBench, path: str, seconds: float | None = None) -> dict:
        seconds = seconds or self.seconds
        addr, port = self.target(path)
        cmd = ["pgbench", "-n", "-S", "-M", b.mode, "-c", str(b.clients), "-j", "1", "-T", str(int(seconds)),
               "-h", addr, "-p", str(port), "-U", PG_USER, "postgres"]

        def parse(stdout: str, wall: float) -> dict:
            tps, done, detail = parse_pgbench(stdout)
            return {"value": tps, "ops": done, **detail}

        return self._timed(path, cmd, seconds, parse)

    def copy_out(self, path: str) -> dict:
        addr, port = self.target(path)
        psql = f"psql -X -h {addr} -p {port} -U {PG_USER} -d postgres -c 'COPY copy_rows TO STDOUT'"
        cmd = ["sh", "-c", f"{psql} | wc -l"]

        def parse(stdout: str, wall: float) -> dict:
            rows = int(stdout.strip().splitlines()[-1])
            if rows != COPY_ROWS:
                raise RuntimeError(f"COPY via {path} returned {rows} rows, not {COPY_ROWS}")
            return {"value": rows / wall, "ops": rows, "seconds": round(wall, 3)}

        return self._timed(path, cmd, 0, parse)

    def idle_memory(self, path: str) -> dict | None:
        """RSS the proxy adds per idle connection: IDLE_CONNECTIONS psycopg connections, opened and held."""
        pid = self.proxy_pid(path)
        if pid is None:
            return None
        addr, port = self.target(path)
        dsn = f"host={addr} port={port} user={PG_USER} dbname=postgres"
        cmd = [sys.executable, "-c", IDLE_CLIENT, dsn, str(IDLE_CONNECTIONS)]
        # warm the proxy's allocator with a first round, so the baseline is a steady state
        for n in (50, IDLE_CONNECTIONS):
            before = rss_kb(pid)
            if path == "interlock":
                full = [sys.executable, "-m", "interceptor.cli", "run", "--state-dir", str(self.inst.state_dir),
                        "--agent", AGENT, "--", *cmd[:-1], str(n)]
            else:
                full = [*cmd[:-1], str(n)]
            p = self.a.popen(full, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=REPO, env=self.env)
            try:
                line = p.stdout.readline()
                if not line.startswith("open"):
                    raise RuntimeError(f"idle clients via {path} failed: {p.stderr.read()[-800:]}")
                time.sleep(1.0)
                during = rss_kb(pid)
            finally:
                p.stdin.close()
                p.wait(timeout=60)
            time.sleep(1.0)
        return {"value": (during - before) / IDLE_CONNECTIONS, "ops": IDLE_CONNECTIONS,
                "rss_before_kb": before, "rss_open_kb": during}

    # ---- the run -------------------------------------------------------------------------------

    def run(self) -> dict[str, dict[str, dict]]:
        short = PgBench("warm", "warm-up", "simple", 8)
        for path in PATHS:  # preflight and warm-up: every path answers, Interlock captures
            self.pgbench(short, path, seconds=max(1.0, self.warmup))
            self.pgbench(PgBench("warm", "warm-up", "extended", 8), path, seconds=1)
        results: dict[str, dict[str, dict]] = {}
        for b in BENCHMARKS:
            results[b.key] = {}
            for path in PATHS:
                print(f"  {b.label:30} {path:9} ", end="", flush=True)
                res = results[b.key][path] = self.pgbench(b, path)
                direct = results[b.key].get("direct", {}).get("value")
                print(f"{res['value']:,.0f} tps" + (f"  ({res['value'] / direct:.2f}x direct)" if direct and path != "direct" else ""),
                      flush=True)
        results["copy"] = {}
        self.copy_out("direct")  # the first read of the table pays for bringing it into memory
        for path in PATHS:
            print(f"  {'COPY 2M rows out, psql':30} {path:9} ", end="", flush=True)
            res = results["copy"][path] = self.copy_out(path)
            direct = results["copy"].get("direct", {}).get("value")
            print(f"{res['value']:,.0f} rows/s ({res['seconds']} s)"
                  + (f"  ({res['value'] / direct:.2f}x direct)" if direct and path != "direct" else ""), flush=True)
        results["idle_rss"] = {}
        for path in PATHS[1:]:
            print(f"  {'RSS per idle connection':30} {path:9} ", end="", flush=True)
            res = self.idle_memory(path)
            if res is not None:
                results["idle_rss"][path] = res
                print(f"{res['value']:.1f} kB ({res['rss_before_kb']} -> {res['rss_open_kb']} kB)", flush=True)
        return results


LINES = [(b.key, b.label, "tps") for b in BENCHMARKS] + [("copy", "COPY 2M rows out, psql", "rows/s")]


def table(results: dict[str, dict[str, dict]]) -> str:
    head = f"{'benchmark':30} {'unit':7}" + "".join(f" {p:>10}" for p in PATHS) + \
        f"   {'haproxy/d':>9} {'pgbouncer/d':>11} {'interlock/d':>11} {'interlock/best':>14}"
    lines = [head, "-" * len(head)]
    for key, label, unit in LINES:
        res = results.get(key)
        if not res:
            continue
        v = {p: res[p]["value"] for p in PATHS if p in res}
        d = v.get("direct")
        best = max((v[p] for p in ("haproxy", "pgbouncer") if p in v), default=None)
        cells = [f"{v[p] / d:.2f}x" if d and p in v else "-" for p in ("haproxy", "pgbouncer", "interlock")]
        cells.append(f"{v['interlock'] / best:.2f}x" if best and "interlock" in v else "-")
        lines.append(f"{label:30} {unit:7}" + "".join(f" {v[p]:>10,.0f}" if p in v else f" {'-':>10}" for p in PATHS)
                     + f"   {cells[0]:>9} {cells[1]:>11} {cells[2]:>11} {cells[3]:>14}")
    rss = results.get("idle_rss", {})
    if rss:
        lines += ["", f"{'RSS per idle connection, kB':30} {'':7}" + "".join(
            f" {rss[p]['value']:>10.1f}" if p in rss else f" {'-':>10}" for p in PATHS)]
    lines += ["", f"{'proxy CPU, us/op':30} {'':7}" + "".join(f" {p:>10}" for p in PATHS)]
    for key, label, _ in LINES:
        res = results.get(key, {})
        lines.append(f"{label:30} {'':7}" + "".join(
            f" {res[p].get('proxy_cpu_us_per_op', '-')!s:>10}" if p in res else f" {'-':>10}" for p in PATHS))
    return "\n".join(lines)
