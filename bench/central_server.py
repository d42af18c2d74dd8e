"""What one central recorder process ingests per second, beside a plain COPY of the same rows.

`python -m bench.central_server [--records N] [--batch B] [--hosts H]` starts PostgreSQL and one
recorder process (lab/central.py) on a lab host, joins H hosts, and sends N records per host in
batches of B over HTTPS with each host's client certificate (bodies pre-built: this measures the
server — TLS, parsing, chain checks, checkpoint, one COPY and the derived upserts — not the
sender), all hosts at once. Then it loads the same rows with one plain COPY per batch into the same
table (the text built before the clock starts), the limit, and prints both rates and their ratio. End to end from a host's spool is
c-read's bench/ingest.py."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import psycopg

from central.ingest import _copy_text
from lab.central import Central, in_host
from lab.netns import Lab
from recorder.records import GENESIS, chain, sign_checkpoint, to_json


def _bodies(host: str, n: int, batch: int, signing) -> list[tuple[bytes, list]]:
    out, prev, seq = [], GENESIS, 1
    sess = f"{time.time_ns() // 1000:x}abcd0123"
    for lo in range(0, n, batch):
        items = [("event", json.dumps({"id": seq + i, "at": time.time(), "kind": "pg-statement", "session": sess,
                                       "data": {"sql": f"SELECT id, name FROM customers WHERE id = {seq + i}", "verdict": "allow",
                                                "rule": "read-only", "objects": ["customers"]}}, separators=(",", ":")))
                 for i in range(min(batch, n - lo))]
        recs = list(chain(host, seq, prev, items))
        prev, seq = bytes.fromhex(recs[-1].hash), recs[-1].seq + 1
        cp = sign_checkpoint(signing, host, recs[-1].seq, prev, time.time_ns() // 1000)
        body = json.dumps({"host": host, "records": [to_json(r) for r in recs], "checkpoints": [to_json(cp)]}).encode()
        out.append((body, recs))
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (/proc/PID/stat fields 14 and 15)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000, help="records per host")
    ap.add_argument("--batch", type=int, default=5_000)
    ap.add_argument("--hosts", type=int, default=2)
    args = ap.parse_args()
    with Lab() as lab, Central(lab.b, workers=1) as rec:
        hosts = [rec.join_host(f"bench-{i}") for i in range(args.hosts)]
        work = [(h, _bodies(h.host_id, args.records, args.batch, h.signing)) for h in hosts]
        errors: list[str] = []

        def send(h, batches):
            def run():
                for body, _ in batches:
                    r = h.client.request("POST", "/v1/ingest", body)
                    if r.status != 200:
                        errors.append(f"{r.status} {r.body[:200]!r}")
                        return
            in_host(rec.host, run)

        threads = [threading.Thread(target=send, args=w) for w in work]
        cpu0 = _cpu_seconds(rec.proc.pid)
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        server_s = time.perf_counter() - t0
        server_cpu = _cpu_seconds(rec.proc.pid) - cpu0
        if errors:
            raise SystemExit(f"ingest refused: {errors[0]}")
        total = args.records * args.hosts
        stored = int(rec.psql("SELECT count(*) FROM records"))
        assert stored == total, (stored, total)
        # the limit: the same rows, plain COPY, one transaction per batch, into the same table
        # (COPY text built before the clock starts: only PostgreSQL's side of the load is timed)
        texts = [_copy_text(h.host_id + "-copy", recs, ["x"] * len(recs), 0) for h, batches in work for _, recs in batches]
        with psycopg.connect(rec.dsn, autocommit=True) as conn:
            t0 = time.perf_counter()
            for text in texts:
                with conn.transaction(), conn.cursor().copy("COPY records (host_id, seq, kind, body, hash, session) FROM STDIN") as cp:
                    cp.write(text)
            copy_s = time.perf_counter() - t0
        ingest_rate, copy_rate = total / server_s, total / copy_s
        print(f"recorder (1 process, {args.hosts} hosts, batches of {args.batch}): {total} records in {server_s:.2f} s = "
              f"{ingest_rate:,.0f} records/s  (target >= 20,000)")
        print(f"  the recorder process used {server_cpu:.2f} CPU s: {total / server_cpu:,.0f} records per CPU second "
              "(what one process does with a core to itself; the box is shared and the sender runs on it too)")
        print(f"plain COPY of the same rows: {copy_rate:,.0f} records/s")
        print(f"ratio: {ingest_rate / copy_rate:.2f}  (target >= 0.3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
