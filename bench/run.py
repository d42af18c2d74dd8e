"""Interlock's data path against the direct path and haproxy, measured in one run.

`python -m bench.run [--quick] [--only pg,iperf,conn]` builds a lab (agent host a, server host b),
starts PostgreSQL 15, an iperf3 server and an echo server on b, haproxy (tcp mode) and an Interlock
daemon on a, and runs each client three ways from a:

  direct     the client talks to the server's address;
  haproxy    the client talks to haproxy on a's loopback, which relays to the server;
  interlock  the client runs enrolled (`interlock run`) and talks to the server's real address;
             the cgroup hooks send it to the proxy, which relays it.

Every number is printed with its ratio to the direct path of the same run (the box is noisy:
ratios from one run are comparable, absolute numbers across runs much less so). Results also go
to bench/results/*.json. Everything started here is stopped here, also on Ctrl-C or failure."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path

from bench import ingest as ingest_bench
from bench import pg as pg_bench
from bench import targets
from bench import web as web_bench
from lab.instance import Instance, leftovers
from lab.netns import Host, Lab
from lab.postgres import PG_USER, Postgres
from lab.testing import default_policy_plus_opaque, stop_process, wait_listening

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

PATHS = ("direct", "haproxy", "interlock")
GROUPS = ("pg", "iperf", "conn")

EXTRA_GROUPS = ("web", "ingest")  # bench/web.py: HTTP and HTTPS with wrk; bench/ingest.py: the central recorder
SERVICE_PORT = {"pg": 5432, "iperf": 5201, "conn": 7000}
HAPROXY_PORT = {"pg": 25432, "iperf": 25201, "conn": 27000}
INTERLOCK_PROXY_PORT = 15001
INTERLOCK_DNS_PORT = 15053
RESERVED_PORTS = "15000-15099,25000-27099"  # Interlock's (here, pg.py's, ingest's), haproxy's and pgbouncer's
INTERLOCK_INBOUND_PORT = 15009  # not proxy_port + 2 (the default): bench/pg.py's proxy listens there
AGENT = "bench"
PG_SCALE = 10
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Durations:
    pg: float
    iperf: float
    conn: float
    warmup: float


FULL = Durations(pg=10, iperf=5, conn=5, warmup=3)
QUICK = Durations(pg=3, iperf=2, conn=2, warmup=1)


@dataclass
class Result:
    value: float
    ops: float | None = None  # transactions or connections completed, for CPU per operation
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Benchmark:
    key: str
    group: str
    label: str
    unit: str
    seconds: Callable[[Durations], float]
    command: Callable[[str, int, Durations], list[str]]
    parse: Callable[[str], Result]


# ---- clients and their output ------------------------------------------------------------------

def pgbench_cmd(clients: int) -> Callable[[str, int, Durations], list[str]]:
    def cmd(addr: str, port: int, d: Durations) -> list[str]:
        return ["pgbench", "-n", "-S", "-c", str(clients), "-j", "1", "-T", str(int(d.pg)),
                "-h", addr, "-p", str(port), "-U", PG_USER, "postgres"]
    return cmd


def parse_pgbench(out: str) -> Result:
    tps = re.search(r"^tps = ([\d.]+)", out, re.M)
    if not tps:
        raise ValueError("no tps line in pgbench output")
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    lat = re.search(r"latency average = ([\d.]+) ms", out)
    return Result(float(tps.group(1)), float(done.group(1)) if done else None,
                  {"latency_ms": float(lat.group(1)) if lat else None})


def iperf_cmd(addr: str, port: int, d: Durations) -> list[str]:
    return ["iperf3", "-c", addr, "-p", str(port), "-t", str(int(d.iperf)), "-J"]


def parse_iperf(out: str) -> Result:
    doc = json.loads(out)
    if doc.get("error"):
        raise ValueError(f"iperf3: {doc['error']}")
    end = doc["end"]
    return Result(end["sum_received"]["bits_per_second"] / 1e9, None,
                  {"retransmits": end["sum_sent"].get("retransmits"),
                   "bytes": end["sum_received"]["bytes"]})


def conn_cmd(addr: str, port: int, d: Durations, parallel: int = 1) -> list[str]:
    return [sys.executable, "-m", "bench.connrate", addr, str(port), "--seconds", str(d.conn), "--parallel", str(parallel)]


def conn8_cmd(addr: str, port: int, d: Durations) -> list[str]:
    return conn_cmd(addr, port, d, 8)


def parse_conn(out: str) -> Result:
    doc = json.loads(out.strip().splitlines()[-1])
    if doc["errors"]:
        raise ValueError(f"{doc['errors']} connections failed, last: {doc['last_error']}")
    return Result(doc["rate"], doc["connections"], {k: doc[k] for k in ("p50_us", "p99_us", "seconds")})


BENCHMARKS = (
    # the pg group (pgbench simple/extended, COPY, idle memory; with pgbouncer) lives in bench/pg.py
    Benchmark("iperf", "iperf", "iperf3, 1 stream", "Gbit/s", lambda d: d.iperf, iperf_cmd, parse_iperf),
    Benchmark("conn", "conn", "new TCP connections", "conn/s", lambda d: d.conn, conn_cmd, parse_conn),
    Benchmark("conn8", "conn", "new TCP conns, 8 at once", "conn/s", lambda d: d.conn, conn8_cmd, parse_conn),
)


# ---- the lab -------------------------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _is_proxy(pid: int) -> bool:
    try:
        return b"proxy.server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def proxy_group(pid: int) -> list[int]:
    """An Interlock proxy worker's pid -> every worker of its daemon (`workers:`); else [pid]."""
    fields = _stat(pid)
    if fields is None or not _is_proxy(pid):
        return [pid]
    parent = fields[1]
    group = [int(p) for p in os.listdir("/proc") if p.isdigit() and (_stat(int(p)) or [None, None])[1] == parent
             and _is_proxy(int(p))]
    return sorted(group) or [pid]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process (all its threads), or None once it is gone. For an
    Interlock proxy worker, of all its daemon's workers together: every module's proxy CPU
    figures (pg, web) go through here."""
    total = 0.0
    for p in proxy_group(pid):
        fields = _stat(p)
        if fields is None:
            return None
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


class Detached(Host):
    """The same lab host, but what is started on it gets a process group of its own.

    A terminal Ctrl-C then reaches only the runner, which stops everything in order; otherwise
    servers would die mid-measurement and the Interlock daemon would stop without tearing down."""

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("process_group", 0)
        return super().popen(cmd, **kw)


def detached(host: Host) -> Detached:
    return Detached(**{f.name: getattr(host, f.name) for f in fields(host)})  # shares `procs`


class Bench:
    """The lab, its servers and proxies; `measure()` runs one client on one path."""

    def __init__(self, stack: contextlib.ExitStack, d: Durations, groups: set[str],
                 haproxy_threads: int | None):
        self.stack, self.d, self.groups = stack, d, groups
        self.haproxy_threads = haproxy_threads
        self.lab: Lab = stack.enter_context(Lab("bn"))
        self.a, self.b = detached(self.lab.a), detached(self.lab.b)
        self.tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="interlock-bench-")))
        self.pg: Postgres | None = None
        self.haproxy: subprocess.Popen | None = None
        self.inst: Instance | None = None
        self.env = {**os.environ, "PYTHONPATH": str(REPO)}

    def setup(self) -> None:
        # Sequential short connections leave TIME_WAIT sockets on a (the client's, and the
        # proxies' upstream ones); let new connections reuse them rather than run out of ports.
        # The wider range covers the listeners' fixed ports, so those are reserved: an ephemeral
        # port left on 26432 by the connection runs once kept pgbouncer from binding it.
        for key, value in (("net.ipv4.tcp_tw_reuse", "1"), ("net.ipv4.ip_local_port_range", "10000 65000"),
                           ("net.ipv4.ip_local_reserved_ports", RESERVED_PORTS)):
            self.a.run(["sysctl", "-qw", f"{key}={value}"], check=True)
        self._start_echo()
        if "pg" in self.groups:
            self._start_postgres()
        if "iperf" in self.groups:
            p = self.b.popen(["iperf3", "-s", "-p", str(SERVICE_PORT["iperf"])],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.stack.callback(stop_process, p)
            wait_listening(self.b, SERVICE_PORT["iperf"], p)
        self._start_haproxy()
        self._start_interlock()

    def _start_echo(self) -> None:
        p = self.b.popen([sys.executable, "-m", "bench.echo", str(SERVICE_PORT["conn"])],
                         stdout=subprocess.PIPE, text=True, cwd=REPO, env=self.env)
        self.stack.callback(stop_process, p)
        if "ready" not in (p.stdout.readline() if p.stdout else ""):
            raise RuntimeError("echo server did not start")

    def _start_postgres(self) -> None:
        # room for bench/pg.py's 500 idle connections through each proxy
        self.pg = Postgres(self.b, port=SERVICE_PORT["pg"], settings={"max_connections": "700"})
        self.stack.callback(self.pg.close)
        self.pg.start()
        print(f"  pgbench -i -s {PG_SCALE} ...", flush=True)
        r = self.b.run(["pgbench", "-i", "-q", "-s", str(PG_SCALE), *self.pg.client_args(), "postgres"],
                       timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"pgbench -i failed: {r.stderr[-2000:]}")
        self.pg.psql("VACUUM ANALYZE")
        self.pg.psql("SELECT count(*) FROM pgbench_accounts")  # pull the table into shared buffers

    def _start_haproxy(self) -> None:
        cfg = self.tmp / "haproxy.cfg"
        lines = ["global", "    maxconn 4000"]  # fits the fd limit; the runs use at most a few
        if self.haproxy_threads:
            lines.append(f"    nbthread {self.haproxy_threads}")
        lines += ["defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 120s",
                  "    timeout server 120s"]
        for group in GROUPS:
            lines += [f"listen {group}", f"    bind 127.0.0.1:{HAPROXY_PORT[group]}",
                      f"    server {group} {self.b.addr4}:{SERVICE_PORT[group]}"]
        cfg.write_text("\n".join(lines) + "\n")
        log = open(self.tmp / "haproxy.log", "ab")
        self.stack.callback(log.close)
        # -db: stay in the foreground, so the PID we hold is haproxy's and stopping it is ours.
        self.haproxy = self.a.popen(["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=log,
                                    stdin=subprocess.DEVNULL)
        self.stack.callback(stop_process, self.haproxy)
        for group in GROUPS:
            wait_listening(self.a, HAPROXY_PORT[group], self.haproxy, self.tmp / "haproxy.log")

    def _start_interlock(self) -> None:
        assert INTERLOCK_PROXY_PORT not in HAPROXY_PORT.values()
        policy = self.tmp / "policy.yaml"
        # the default policy; iperf3's and the echo's bytes may be relayed unread
        policy.write_text(default_policy_plus_opaque([self.b.addr4], [SERVICE_PORT["iperf"], SERVICE_PORT["conn"]]))
        self.inst = self._interlock(policy)

    def _interlock(self, policy: Path, **config) -> Instance:
        inst = Instance(self.a, f"bench{os.getpid() % 100000}", proxy_port=INTERLOCK_PROXY_PORT,
                        dns_port=INTERLOCK_DNS_PORT, inbound_port=INTERLOCK_INBOUND_PORT, policy=str(policy), **config)
        self.stack.callback(self._close_interlock, inst)
        inst.start()
        return inst

    def compare_workers(self, counts: tuple[int, ...] = (1, 2)) -> dict[str, dict[str, Result]]:
        """New connections (one and eight at a time) through Interlock restarted with each worker
        count (direct and haproxy measured again alongside, for the same-run ratio)."""
        out: dict[str, dict[str, Result]] = {}
        for n in counts:
            assert self.inst is not None
            self._close_interlock(self.inst)
            self.inst = self._interlock(self.tmp / "policy.yaml", workers=n)
            for conn in (b for b in BENCHMARKS if b.group == "conn"):
                self.measure(conn, "interlock", Durations(pg=1, iperf=1, conn=0.3, warmup=0))  # preflight
                res = out[f"{conn.key} workers={n}"] = {p: self.measure(conn, p) for p in PATHS}
                print(f"  {conn.label:24} workers={n:<2} {fmt(res['interlock'].value)} {conn.unit}"
                      f"  ({ratio(res, 'interlock'):.2f}x direct; haproxy {ratio(res, 'haproxy'):.2f}x)", flush=True)
        return out

    @staticmethod
    def _close_interlock(inst: Instance) -> None:
        try:
            inst.down()
            if leftovers(inst):
                # Name the instance explicitly, in case its run files are gone or unreadable.
                inst.cli("down", "--config", str(inst.config_file))
        finally:
            inst.close()
        left = leftovers(inst)
        if left:
            print(f"WARNING: Interlock instance left behind: {', '.join(left)}", file=sys.stderr)

    # ---- one client on one path ---------------------------------------------------------------

    def target(self, path: str, group: str) -> tuple[str, int]:
        if path == "haproxy":
            return "127.0.0.1", HAPROXY_PORT[group]
        return self.b.addr4, SERVICE_PORT[group]

    def client(self, path: str, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
        kw = {"timeout": timeout, "cwd": REPO, "env": self.env}
        if path == "interlock":
            assert self.inst is not None
            return self.inst.agent(cmd, agent=AGENT, **kw)
        return self.a.run(cmd, **kw)

    def proxy_pid(self, path: str) -> int | None:
        if path == "haproxy" and self.haproxy is not None:
            return self.haproxy.pid
        if path == "interlock" and self.inst is not None:
            info = json.loads((self.inst.state_dir / "run" / "instance.json").read_text())
            return int(info["proxy_pid"])
        return None

    def sessions(self, port: int, since: float) -> dict[str, int]:
        """Interlock's recorded sessions to `port` since `since`, by outcome: proof of capture."""
        assert self.inst is not None
        db = self.inst.state_dir / "recorder.db"
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
            rows = conn.execute("SELECT outcome, count(*) FROM sessions WHERE agent = ? AND dst_port = ?"
                                " AND started >= ? GROUP BY outcome", (AGENT, port, since)).fetchall()
        return dict(rows)

    def measure(self, bench: Benchmark, path: str, d: Durations | None = None) -> Result:
        d = d or self.d
        addr, port = self.target(path, bench.group)
        pid = self.proxy_pid(path)
        cpu0 = cpu_seconds(pid) if pid else None
        since = time.time()
        t0 = time.monotonic()
        r = self.client(path, bench.command(addr, port, d), timeout=bench.seconds(d) + 120)
        wall = time.monotonic() - t0
        cpu1 = cpu_seconds(pid) if pid else None
        if r.returncode != 0:
            raise RuntimeError(f"{bench.label} via {path} failed ({r.returncode}): "
                               f"{(r.stderr or r.stdout)[-1500:]}")
        res = bench.parse(r.stdout)
        res.detail["wall_s"] = round(wall, 3)
        if cpu0 is not None and cpu1 is not None:
            cpu = cpu1 - cpu0
            res.detail["proxy_cpu_s"] = round(cpu, 3)
            res.detail["proxy_cpu_pct"] = round(100 * cpu / bench.seconds(d), 1)
            if res.ops:
                res.detail["proxy_cpu_us_per_op"] = round(1e6 * cpu / res.ops, 1)
        elif pid:
            res.detail["proxy_cpu_note"] = "proxy process changed or exited during the run"
        if path == "interlock":
            if self.proxy_pid(path) != pid:
                res.detail["proxy_restarted"] = True
            # The proxy records a close a moment after the client has gone; give it that moment,
            # so a session still "open" afterwards means one the proxy never finished.
            deadline = time.monotonic() + 3
            seen = self.sessions(SERVICE_PORT[bench.group], since)
            while seen.get("open") and time.monotonic() < deadline:
                time.sleep(0.1)
                seen = self.sessions(SERVICE_PORT[bench.group], since)
            res.detail["sessions"] = seen
            if not seen:
                raise RuntimeError(f"{bench.label}: Interlock recorded no session: the client was not captured")
        return res

    def preflight(self) -> None:
        """A few connections on every path before spending minutes measuring."""
        conn = next(b for b in BENCHMARKS if b.key == "conn")
        short = Durations(pg=1, iperf=1, conn=0.3, warmup=0)
        for path in PATHS:
            self.measure(conn, path, short)


# ---- report --------------------------------------------------------------------------------------

def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def ratio(results: dict[str, Result], path: str) -> float | None:
    direct, other = results.get("direct"), results.get(path)
    if not direct or not other or not direct.value:
        return None
    return other.value / direct.value


def table(measured: dict[str, dict[str, Result]]) -> str:
    head = (f"{'benchmark':24} {'unit':7} {'direct':>9} {'haproxy':>9} {'interlock':>9}   "
            f"{'haproxy/direct':>14} {'interlock/direct':>16}")
    lines = [head, "-" * len(head)]
    for b in BENCHMARKS:
        res = measured.get(b.key)
        if not res:
            continue
        vals = [fmt(res[p].value) if p in res else "-" for p in PATHS]
        rh, ri = ratio(res, "haproxy"), ratio(res, "interlock")
        lines.append(f"{b.label:24} {b.unit:7} {vals[0]:>9} {vals[1]:>9} {vals[2]:>9}   "
                     f"{fmt(rh) + 'x' if rh else '-':>14} {fmt(ri) + 'x' if ri else '-':>16}")
    lines += ["", f"{'proxy CPU':24} {'haproxy %core':>14} {'us/op':>7} {'interlock %core':>16} {'us/op':>7}"]
    for b in BENCHMARKS:
        res = measured.get(b.key)
        if not res:
            continue
        cells = []
        for p in ("haproxy", "interlock"):
            det = res[p].detail if p in res else {}
            cells += [fmt(det.get("proxy_cpu_pct")), fmt(det.get("proxy_cpu_us_per_op"))]
        lines.append(f"{b.label:24} {cells[0]:>14} {cells[1]:>7} {cells[2]:>16} {cells[3]:>7}")
    return "\n".join(lines)


def workers_table(by: dict[str, dict[str, dict]]) -> str:
    head = f"{'new connections, workers':24} {'conn/s':>9} {'/direct':>8} {'haproxy/direct':>15} {'proxy us/op':>12}"
    lines = [head, "-" * len(head)]
    for n, res in by.items():
        mine = res.get("interlock", {})
        lines.append(f"{n:24} {fmt(mine.get('value')):>9} {fmt(mine.get('ratio_to_direct')) + 'x':>8} "
                     f"{fmt(res.get('haproxy', {}).get('ratio_to_direct')) + 'x':>15} "
                     f"{fmt(mine.get('proxy_cpu_us_per_op')):>12}")
    return "\n".join(lines)


def version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except OSError:
        return "unknown"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "unknown"


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def metadata(args: argparse.Namespace, d: Durations, bench: Bench) -> dict:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return {
        "when": datetime.now().isoformat(timespec="seconds"),
        "commit": commit.stdout.strip(), "uncommitted_changes": bool(dirty.stdout.strip()),
        "kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "haproxy": version(["haproxy", "-v"]), "haproxy_threads": args.haproxy_threads or "default",
        "postgres": version([str(Path("/usr/lib/postgresql/15/bin/postgres")), "--version"]),
        "iperf3": version(["iperf3", "--version"]), "interlock_workers": args.workers or "default (one per CPU)",
        "quick": args.quick, "durations": asdict(d),
        "pg_scale": PG_SCALE, "server": bench.b.addr4, "loadavg_start": loadavg(),
        "ports": {"service": SERVICE_PORT, "haproxy": HAPROXY_PORT,
                  "interlock_proxy": INTERLOCK_PROXY_PORT},
    }


# ---- main ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so the cleanup callbacks run.

    Only in this process: pyroute2 forks helpers that inherit the handler, and a helper that
    unwound our stack would tear the lab down from under us; they get the default action."""
    me = os.getpid()

    def interrupt(signum: int, frame: object) -> None:
        if os.getpid() != me:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs, for checking the harness")
    ap.add_argument("--only", default=",".join(GROUPS + EXTRA_GROUPS), help="comma-separated subset of: pg,iperf,conn,web,ingest")
    ap.add_argument("--haproxy-threads", type=int, help="haproxy nbthread (default: haproxy's, one per CPU)")
    ap.add_argument("--workers", type=int, help="Interlock proxy workers, in every group (default: one per CPU)")
    ap.add_argument("--compare-workers", action="store_true",
                    help="also measure new connections with 1 and with 2 proxy workers")
    args = ap.parse_args(argv)
    if args.workers:
        Instance.DEFAULTS["workers"] = args.workers
    groups = {g.strip() for g in args.only.split(",") if g.strip()}
    if not groups or groups - set(GROUPS + EXTRA_GROUPS):
        ap.error(f"--only takes a subset of {','.join(GROUPS + EXTRA_GROUPS)}")
    if os.geteuid() != 0:
        ap.error("must run as root (network namespaces, cgroup BPF)")
    d = QUICK if args.quick else FULL
    measured: dict[str, dict[str, Result]] = {}
    web_results: dict[str, dict[str, dict]] = {}
    by_workers: dict[str, dict[str, Result]] = {}
    pg_results: dict[str, dict[str, dict]] = {}
    ingest_results: dict = {}
    started = time.monotonic()
    try:
        with signals_interrupt(), contextlib.ExitStack() as stack:
            print("setting up the lab ...", flush=True)
            bench = Bench(stack, d, groups, args.haproxy_threads)
            bench.setup()
            meta = metadata(args, d, bench)
            if meta["loadavg_start"] > 0.5:
                print(f"note: load average {meta['loadavg_start']:.1f} on {os.cpu_count()} CPUs: other work is "
                      "running, the numbers will be noisy", flush=True)
            print("preflight (every path works, Interlock captures) ...", flush=True)
            bench.preflight()
            for b in BENCHMARKS:
                if b.group not in groups:
                    continue
                measured[b.key] = {}
                for path in PATHS:
                    print(f"  {b.label:24} {path:9} ", end="", flush=True)
                    res = bench.measure(b, path)
                    measured[b.key][path] = res
                    r = ratio(measured[b.key], path)
                    print(f"{fmt(res.value)} {b.unit}" + (f"  ({r:.2f}x direct)" if r and path != "direct" else ""),
                          flush=True)
            if args.compare_workers and "conn" in groups:
                print("proxy workers: 1 vs 2 (new connections) ...", flush=True)
                by_workers = bench.compare_workers()
            if "pg" in groups:
                print("PostgreSQL (pgbench, COPY, idle memory; haproxy, pgbouncer, Interlock) ...", flush=True)
                pgb = pg_bench.Pg(stack, bench.a, bench.b, bench.tmp, bench.pg, (HAPROXY_PORT["pg"], bench.haproxy.pid),
                                  d.pg, d.warmup, cpu_seconds)
                pgb.setup()
                pg_results = pgb.run()
            if "web" in groups:
                print("HTTP and HTTPS (wrk; nginx, haproxy, mitmproxy, Interlock) ...", flush=True)
                web = web_bench.Web(stack, bench.a, bench.b, bench.tmp, d.conn, cpu_seconds)
                web.setup()
                web_results = web.run()
            if "ingest" in groups:  # last: it restarts bench's Interlock with `recorder:` configured
                print("central recorder (ingest vs COPY; data path with and without shipping) ...", flush=True)
                ingest_results = ingest_bench.run(stack, bench, d, args.quick, cpu_seconds)
            print("tearing down ...", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted; lab torn down", file=sys.stderr)
        return 130
    if measured:
        print()
        print(table(measured))
    if pg_results:
        print()
        print(pg_bench.table(pg_results))
    if web_results:
        print()
        print(web_bench.table(web_results))
    if ingest_results:
        print()
        print(ingest_bench.table(ingest_results))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench-{datetime.now():%Y%m%d-%H%M%S}.json"
    meta["loadavg_end"] = loadavg()
    doc = {"meta": meta, "elapsed_s": round(time.monotonic() - started, 1),
           "results": {k: {p: {"value": r.value, "unit": next(b.unit for b in BENCHMARKS if b.key == k),
                               "ratio_to_direct": ratio(v, p), "ops": r.ops, **r.detail}
                           for p, r in v.items()} for k, v in measured.items()},
           "postgres": pg_results, "web": web_results, "ingest": ingest_results,
           "workers": {n: {p: {"value": r.value, "ratio_to_direct": ratio(v, p), "ops": r.ops, **r.detail}
                           for p, r in v.items()} for n, v in by_workers.items()}}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print()
    print(targets.table(doc))
    if by_workers:
        print()
        print(workers_table(doc["workers"]))
    print(f"\nresults: {out.relative_to(REPO)} ({doc['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
