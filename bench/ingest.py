"""The central recorder's ingest, end to end, against PostgreSQL's own COPY; and the agent's data path
with shipping on against off: `bench.run --only ingest`.

Ingest: on host a, a host spool of N records as the daemon keeps it (the SQLite recorder with the
journal triggers of recorder/journal.py; the sessions, their statement decisions and closes written
as the proxy writes them, the journal filled by the triggers; chained and signed by the real
Chainer). The real shipper (recorder/shipper.py, its own process) sends them over mTLS to one
recorder process (`python -m central serve`, lab/central.py; in a's namespace as well, since b's
port 5432 is the benchmark's PostgreSQL: on one kernel a veth hop costs what loopback does), which checks
every link and checkpoint and stores them in PostgreSQL 15. Measured: records/s from the shipper's
start to the server's ack of the last record. In the same run, the same rows (host, seq, kind,
body, hash, session) are loaded into the same `records` table with one plain COPY (text format,
prepared before the clock starts): the limit. Targets (issue 11): ingest >= 0.3x COPY and
>= 20,000 records/s.

Data path: bench.run's `conn` line (new TCP connections: two journal rows each) and pgbench -S
(one statement event per transaction) through two daemons on host a, bench.run's own (no
`recorder:`) and a second one joined to a recorder (`interlock join`) and configured with it, in
alternating order over 3 rounds (1 with --quick), each run beside the direct path measured just
before it; per line, the median ratio to direct of each. Target: with shipping, no more than 5%
slower (ratio with/without >= 0.95).

`python -m bench.ingest ship STATE_DIR` is the shipper process the benchmark starts."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FULL_RECORDS, QUICK_RECORDS = 200_000, 40_000
STATEMENTS_PER_SESSION = 3  # a session: open, 3 statement decisions, close = 5 records
RECORDER_PORT = 8443
TARGET_RATIO, TARGET_RATE, TARGET_DATAPATH = 0.3, 20_000, 0.95
COPY_RUNS = 3


# ---- the host spool --------------------------------------------------------------------------------

def fill_spool(db: Path, host_id: str, n: int, start: float | None = None) -> int:
    """Write sessions, statement decisions and closes into the recorder database at `db` (journal
    installed for `host_id`) until the triggers have journaled `n` rows; returns the rows journaled."""
    from recorder import journal, store

    conn = sqlite3.connect(str(db), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        journal.install(conn, host_id)
        cols = list(store.SESSION_COLUMNS)
        t0 = start or time.time() - 3600
        per = 2 + STATEMENTS_PER_SESSION
        sessions = (n + per - 1) // per
        conn.execute("BEGIN")
        for i in range(sessions):
            sid = f"{int((t0 + i * 0.01) * 1e6):x}{i:08x}"
            row = {"id": sid, "agent": f"agent-{i % 7}", "pid": 4000 + i % 500, "tgid": 4000 + i % 500, "uid": 65533,
                   "gid": 65533, "comm": "psql", "exe": "/usr/bin/psql", "cmdline": "psql -h db.internal -c select",
                   "cgroup_id": 9127, "dst_addr": "10.20.0.5", "dst_port": 5432, "family": "ipv4", "protocol": "postgres",
                   "started": t0 + i * 0.01, "ended": None, "bytes_up": 0, "bytes_down": 0, "outcome": "open", "detail": None,
                   "verdict": "allow", "rule": "app-db"}
            conn.execute(f"INSERT INTO sessions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                         [row.get(c) for c in cols])  # columns not sampled here (identity): NULL
            for k in range(STATEMENTS_PER_SESSION):
                data = {"verdict": "allow", "protocol": "postgres", "action": "read", "objects": ["public.orders"],
                        "summary": f"SELECT id, total, status FROM orders WHERE customer_id = $1 ORDER BY id LIMIT {k + 10}",
                        "rule": "app-db", "reason": "rule app-db: allow"}
                conn.execute("INSERT INTO events (at, kind, session, data) VALUES (?, 'decision', ?, ?)",
                             (t0 + i * 0.01 + 0.001 * (k + 1), sid, json.dumps(data)))
            conn.execute("UPDATE sessions SET outcome = 'closed', ended = ?, bytes_up = ?, bytes_down = ? WHERE id = ?",
                         (t0 + i * 0.01 + 0.005, 310, 2870, sid))
        conn.execute("COMMIT")
        # the last session may overshoot n: drop the surplus journal rows (never chained, never shipped)
        conn.execute("DELETE FROM journal WHERE id > (SELECT min(id) + ? - 1 FROM journal)", (n,))
        return conn.execute("SELECT count(*) FROM journal").fetchone()[0]
    finally:
        conn.close()


def chain_spool(db: Path, host_id: str, signing_key: Path) -> tuple[int, float]:
    """Chain and sign every journal row with the real Chainer; (records chained, seconds)."""
    from recorder import journal, records

    ch = journal.Chainer(db, host_id, records.load_signing_key(signing_key))
    t0 = time.monotonic()
    total = 0
    try:
        while True:
            n = ch.run_once(now=time.time() + journal.CHECKPOINT_INTERVAL * (total // journal.CHAIN_BATCH + 1))
            total += n
            if n == 0:
                break
        ch.run_once(now=time.time() + 3600)  # a checkpoint over the head
    finally:
        ch.conn.close()
    return total, time.monotonic() - t0


def ship(state_dir: Path, timeout: float = 600) -> dict:
    """Run the real shipper until the recorder has acked the whole chain (in this process: `ship` verb)."""
    from recorder import journal
    from recorder.join import HostFiles
    from recorder.shipper import Shipper

    files = HostFiles.load(state_dir)
    db = state_dir / "recorder.db"
    conn = journal.connect(db)
    head = conn.execute("SELECT head_seq FROM journal_state").fetchone()[0]
    s = Shipper(db, files)
    t0, cpu0 = time.monotonic(), time.process_time()
    s.start()
    acked, last_move, moved = 0, t0, 0
    try:
        while acked < head:
            time.sleep(0.01)
            now_acked = conn.execute("SELECT acked_seq FROM journal_state").fetchone()[0]
            if now_acked != acked:
                acked, last_move = now_acked, time.monotonic()
            elif time.monotonic() - last_move > 60:
                raise RuntimeError(f"no progress for 60 s at seq {acked} of {head}: {s.state()}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"shipped {acked} of {head} in {timeout} s")
        elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
    finally:
        moved = s.sent
        s.stop()
        conn.close()
    return {"records": head, "seconds": round(elapsed, 3), "rate": round(head / elapsed, 1), "stored": moved,
            "shipper_cpu_s": round(cpu, 2)}


def copy_text(db: Path, host_id: str) -> tuple[bytes, int]:
    """The chained journal as COPY text rows of records (host_id, seq, kind, body, hash, session)."""
    from recorder.records import Record
    from recorder.verify import session_of

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    out, n = [], 0
    try:
        for seq, kind, body, h in conn.execute("SELECT seq, kind, body, hash FROM journal WHERE seq IS NOT NULL ORDER BY seq"):
            session = session_of(Record(host_id, seq, kind, body, h))
            out.append(f"{host_id}\t{seq}\t{kind}\t{esc(body)}\t\\\\x{h}\t{esc(session) if session else chr(92) + 'N'}\n")
            n += 1
    finally:
        conn.close()
    return "".join(out).encode(), n


def copy_rate(dsn: str, data: bytes, n: int) -> dict:
    """One COPY of the prepared rows into `records`, timed from the statement to the commit."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        backend = conn.info.backend_pid  # its CPU is read while it lives: a backend's exit takes it along
        cpu0 = _cpu(backend)
        t0 = time.monotonic()
        with conn.cursor() as cur, cur.copy("COPY records (host_id, seq, kind, body, hash, session) FROM STDIN") as cp:
            view = memoryview(data)
            for i in range(0, len(view), 1 << 20):
                cp.write(view[i:i + (1 << 20)])
        conn.commit()
        elapsed = time.monotonic() - t0
        cpu = _cpu(backend) - cpu0
    return {"records": n, "seconds": round(elapsed, 3), "rate": round(n / elapsed, 1), "bytes": len(data),
            "postgres_cpu_s": round(cpu, 2)}


def _cpu(pid: int) -> float:
    from bench.run import CLK_TCK

    stat = Path(f"/proc/{pid}/stat").read_text()
    f = stat[stat.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK


def postgres_cpu(rec) -> float:
    """CPU seconds of every process of the recorder's PostgreSQL cluster (the postmaster's children)."""
    from bench.run import CLK_TCK

    root, total = rec.pg.proc.pid, 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()
        if int(d.name) == root or int(f[1]) == root:
            total += (int(f[11]) + int(f[12])) / CLK_TCK
    return total


# ---- inside bench.run -------------------------------------------------------------------------------

def measure_ingest(host, tmp: Path, n: int, cpu_seconds) -> dict:
    """N records from a spool on `host` through the shipper to a recorder + PostgreSQL on `host`, then the COPY."""
    from lab.central import Central

    print(f"  recorder + PostgreSQL on {host.name} ...", flush=True)
    rec = Central(host, port=RECORDER_PORT)
    try:
        rec.start()
        return _ingest(rec, host, tmp, n, cpu_seconds)
    finally:
        rec.close()


def _ingest(rec, host, tmp: Path, n: int, cpu_seconds) -> dict:
    from lab.central import in_host
    from recorder.join import join

    state = tmp / "ingest-host"
    files = in_host(host, join, state, rec.url, rec.token(), "bench-host")
    db = state / "recorder.db"
    t0 = time.monotonic()
    journaled = fill_spool(db, files.host_id, n)
    spool_s = time.monotonic() - t0
    chained, chain_s = chain_spool(db, files.host_id, files.signing_key)
    print(f"  spool: {journaled:,} records written in {spool_s:.1f} s, chained and signed at {chained / chain_s:,.0f}/s",
          flush=True)
    cpu0, pg0 = cpu_seconds(rec.proc.pid), postgres_cpu(rec)
    r = host.run([sys.executable, "-m", "bench.ingest", "ship", str(state)], cwd=REPO, timeout=900,
                  env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    cpu1, pg1 = cpu_seconds(rec.proc.pid), postgres_cpu(rec)
    if r.returncode != 0:
        raise RuntimeError(f"shipper failed: {(r.stderr or r.stdout)[-1500:]}")
    shipped = json.loads(r.stdout.strip().splitlines()[-1])
    shipped["postgres_cpu_s"] = round(pg1 - pg0, 2)
    stored = int(rec.psql(f"SELECT count(*) FROM records WHERE host_id = '{files.host_id}'"))
    if stored != journaled:
        raise RuntimeError(f"the recorder stored {stored} records of {journaled}")
    if cpu0 is not None and cpu1 is not None:
        shipped["recorder_cpu_s"] = round(cpu1 - cpu0, 2)
        shipped["recorder_cpu_us_per_record"] = round(1e6 * (cpu1 - cpu0) / journaled, 1)
    print(f"  shipper -> recorder -> PostgreSQL: {shipped['rate']:,.0f} records/s ({journaled:,} in {shipped['seconds']} s)",
          flush=True)
    # COPY three times (a host id each: the same table, the same rows), the median: one burst of a few
    # seconds on a shared machine lands in a quiet or a busy moment, and the ratio swings with it
    copies = []
    for k in range(COPY_RUNS):
        data, rows = copy_text(db, f"{files.host_id}-copy{k}")
        copies.append(copy_rate(rec.dsn, data, rows))
    copied = sorted(copies, key=lambda c: c["rate"])[len(copies) // 2]
    print(f"  plain COPY of the same rows:       {copied['rate']:,.0f} records/s (median of "
          + ", ".join(f"{c['rate']:,.0f}" for c in copies) + ")", flush=True)
    # what each costs in CPU, whatever else the machine runs: the whole pipeline's against COPY's server side
    pipeline_us = 1e6 * (shipped.get("recorder_cpu_s", 0) + shipped["postgres_cpu_s"] + shipped.get("shipper_cpu_s", 0)) / journaled
    copy_us = 1e6 * copied["postgres_cpu_s"] / rows
    return {"records": journaled, "spool_write_s": round(spool_s, 2), "chain_rate": round(chained / chain_s, 1),
            "ingest": shipped, "copy": copied, "copy_runs": copies, "ratio": round(shipped["rate"] / copied["rate"], 3),
            "cpu_us_per_record": {"pipeline": round(pipeline_us, 1), "copy_postgres": round(copy_us, 1)}}


def measure_datapath(bench, d, stack: contextlib.ExitStack, rounds: int) -> dict:
    """bench.run's conn line and pgbench -S (8 clients) through two daemons on host a, one without
    `recorder:` (bench.run's own) and one with it, in alternating order for `rounds` rounds, each
    beside the direct path measured just before it; per line the median ratio to direct of each."""
    import statistics

    from bench import run as br
    from lab.central import Central
    from lab.instance import INTERLOCK, Instance

    if bench.pg is None:
        bench._start_postgres()
    lines = [next(b for b in br.BENCHMARKS if b.key == "conn"),
             br.Benchmark("pgbench_c8", "pg", "pgbench -S simple, 8 clients", "tps", lambda d_: d_.pg, br.pgbench_cmd(8),
                          br.parse_pgbench)]
    # the recorder in the agent host's namespace: b's port 5432 is the benchmark's PostgreSQL
    rec = Central(bench.a, port=RECORDER_PORT)
    stack.callback(rec.close)
    rec.start()
    without: Instance = bench.inst
    config = {k: v for k, v in without.config.items() if k not in ("instance", "cgroup_root", "proxy_port", "dns_port",
                                                                    "inbound_port")}
    shipping = Instance(bench.a, f"{without.name}s", proxy_port=br.INTERLOCK_PROXY_PORT + 10,
                        dns_port=br.INTERLOCK_DNS_PORT + 10, inbound_port=br.INTERLOCK_INBOUND_PORT + 10,
                        recorder={"server": rec.url}, **config)
    stack.callback(br.Bench._close_interlock, shipping)
    r = shipping.host.run([*INTERLOCK, "join", "--state-dir", str(shipping.state_dir), "--server", rec.url,
                           "--token", rec.token(), "--name", "bench-agent-host", "--json"], cwd=REPO, env=bench.env)
    if r.returncode != 0:
        raise RuntimeError(f"interlock join failed: {r.stderr or r.stdout}")
    host_id = json.loads(r.stdout)["host_id"]
    shipping.start()
    daemons = {"without": without, "with": shipping}
    samples: dict[str, dict[str, list]] = {ln.key: {"without": [], "with": []} for ln in lines}
    try:
        bench.inst = shipping
        bench.measure(lines[0], "interlock", br.Durations(pg=1, iperf=1, conn=0.3, warmup=0))  # it captures
        for rnd in range(rounds):
            for ln in lines:
                for mode in (("without", "with") if rnd % 2 == 0 else ("with", "without")):
                    bench.inst = daemons[mode]
                    direct, mine = bench.measure(ln, "direct"), bench.measure(ln, "interlock")
                    ratio = mine.value / direct.value
                    samples[ln.key][mode].append({"direct": direct.value, "interlock": mine.value, "ratio": round(ratio, 3),
                                                  "proxy_cpu_us_per_op": mine.detail.get("proxy_cpu_us_per_op")})
                    print(f"  {ln.label:30} round {rnd + 1} shipping {mode:7} {br.fmt(mine.value)} {ln.unit} "
                          f"({ratio:.2f}x direct)", flush=True)
    finally:
        bench.inst = without
    stored = int(rec.psql(f"SELECT count(*) FROM records WHERE host_id = '{host_id}'"))
    st = json.loads(shipping.cli("status", "--json").stdout).get("recorder", {})
    if stored == 0:
        raise RuntimeError(f"shipping on, but the recorder stored nothing: {st}")
    out: dict[str, dict] = {"shipping": {"records_stored": stored, "status": st}, "rounds": rounds}
    for ln in lines:
        res = {mode: {"samples": samples[ln.key][mode],
                      "ratio_to_direct": round(statistics.median(x["ratio"] for x in samples[ln.key][mode]), 3)}
               for mode in ("without", "with")}
        res["with_over_without"] = round(res["with"]["ratio_to_direct"] / res["without"]["ratio_to_direct"], 3)
        # the proxy's own CPU per operation: what shipping adds on the data path itself (journal triggers,
        # the chainer's write lock), apart from the CPU the rest of the pipeline takes from a shared machine
        cpu = {m: [x["proxy_cpu_us_per_op"] for x in samples[ln.key][m] if x["proxy_cpu_us_per_op"]] for m in ("without", "with")}
        if cpu["without"] and cpu["with"]:
            res["proxy_cpu_us_per_op"] = {m: round(statistics.median(v), 1) for m, v in cpu.items()}
            res["proxy_cpu_with_over_without"] = round(res["proxy_cpu_us_per_op"]["with"] / res["proxy_cpu_us_per_op"]["without"], 3)
        out[ln.key] = res
    return out


def run(stack: contextlib.ExitStack, bench, d, quick: bool, cpu_seconds) -> dict:
    """The ingest group inside bench.run: both measurements; the results document's "ingest" key."""
    # the recorder in a's namespace too (b's port 5432 is the benchmark's PostgreSQL): one kernel either way
    out = {"ingest": measure_ingest(bench.a, bench.tmp, QUICK_RECORDS if quick else FULL_RECORDS, cpu_seconds)}
    print("  agent data path, shipping off vs on ...", flush=True)
    out["datapath"] = measure_datapath(bench, d, stack, rounds=1 if quick else 3)
    return out


def table(res: dict) -> str:
    ing = res.get("ingest") or {}
    lines = ["central recorder (issue 11)"]
    if ing:
        lines += [f"  ingest end to end (spool -> shipper -> recorder -> PostgreSQL): {ing['ingest']['rate']:>10,.0f} records/s"
                  f"   target >= {TARGET_RATE:,}  {'met' if ing['ingest']['rate'] >= TARGET_RATE else 'NOT MET'}",
                  f"  plain COPY of the same rows into the same table:               {ing['copy']['rate']:>10,.0f} records/s",
                  f"  ingest / COPY:                                                 {ing['ratio']:>10.2f}x"
                  f"          target >= {TARGET_RATIO}x  {'met' if ing['ratio'] >= TARGET_RATIO else 'NOT MET'}"]
        if ing["ingest"].get("recorder_cpu_us_per_record") is not None:
            i = ing["ingest"]
            lines.append(f"  CPU during ingest: recorder {i['recorder_cpu_s']} s ({i['recorder_cpu_us_per_record']} us/record), "
                         f"PostgreSQL {i.get('postgres_cpu_s')} s, shipper {i.get('shipper_cpu_s')} s of {i['seconds']} s; "
                         f"host chainer {ing['chain_rate']:,.0f} records/s")
        cpu = ing.get("cpu_us_per_record")
        if cpu:
            lines.append(f"  CPU per record: shipper + recorder + PostgreSQL {cpu['pipeline']} us, COPY's PostgreSQL "
                         f"{cpu['copy_postgres']} us (the wall-clock rates above depend on what else the machine runs)")
    dp = res.get("datapath") or {}
    for key, label in (("conn", "new TCP connections"), ("pgbench_c8", "pgbench -S simple, 8 clients")):
        if key in dp:
            x = dp[key]
            lines.append(f"  {label:30} /direct without shipping {x['without']['ratio_to_direct']:.2f}x, with "
                         f"{x['with']['ratio_to_direct']:.2f}x: with/without {x['with_over_without']:.2f}"
                         f"   target >= {TARGET_DATAPATH}  {'met' if x['with_over_without'] >= TARGET_DATAPATH else 'NOT MET'}")
            if x.get("proxy_cpu_us_per_op"):
                c = x["proxy_cpu_us_per_op"]
                lines.append(f"  {'':30} proxy CPU per operation {c['without']} us without, {c['with']} us with shipping "
                             f"({x['proxy_cpu_with_over_without']:.2f}x)")
    return "\n".join(lines)


def register_targets() -> None:
    """Our lines in bench/targets.py's summary, where that module exists."""
    try:
        from bench import targets
    except ImportError:
        return

    def ingest(doc: dict):
        ing = (doc.get("ingest") or {}).get("ingest")
        if not ing:
            return None
        return targets.Measured(f"{ing['ingest']['rate']:,.0f}/s, {ing['ratio']:.2f}x COPY",
                                ing["ingest"]["rate"] >= TARGET_RATE and ing["ratio"] >= TARGET_RATIO)

    def datapath(key: str):
        def check(doc: dict):
            x = ((doc.get("ingest") or {}).get("datapath") or {}).get(key)
            return None if not x else targets.Measured(f"{x['with_over_without']:.2f}x", x["with_over_without"] >= TARGET_DATAPATH)
        return check

    targets.register("ingest", "central recorder ingest", f">= {TARGET_RATE:,} records/s and >= {TARGET_RATIO}x COPY", ingest)
    targets.register("ship_conn", "new connections, shipping on/off", f">= {TARGET_DATAPATH}", datapath("conn"))
    targets.register("ship_pg", "pgbench -S c8, shipping on/off", f">= {TARGET_DATAPATH}", datapath("pgbench_c8"))


register_targets()


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "ship":
        print(json.dumps(ship(Path(argv[1]))), flush=True)
        return 0
    print("usage: python -m bench.ingest ship STATE_DIR (the shipper process of `bench.run --only ingest`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
