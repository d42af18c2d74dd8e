"""New TCP connections per second: connect, send, read the echo, close; one at a time.

`python -m bench.connrate HOST PORT [--seconds S] [--count N] [--parallel P]` stops at whichever
comes first and prints one JSON line. Sequential on purpose: each connection's setup cost (and a
proxy's per connection work) is on the critical path, which is what this benchmark is meant to
expose. With --parallel, P threads each run that loop (connections arrive P at a time: what
several proxy workers can share)."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

PAYLOAD = b"interlock-bench\n"


def one(family: socket.AddressFamily, target: tuple[str, int]) -> None:
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.settimeout(5)
        s.connect(target)
        s.sendall(PAYLOAD)
        got = b""
        while len(got) < len(PAYLOAD):
            chunk = s.recv(len(PAYLOAD) - len(got))
            if not chunk:
                raise ConnectionError("closed before the echo came back")
            got += chunk
    finally:
        s.close()


def loop(family: socket.AddressFamily, target: tuple[str, int], count: int, deadline: float, out: dict) -> None:
    """One client: connections one after another until count or deadline; results into out."""
    latencies: list[float] = out["latencies"]
    now = time.perf_counter()
    while len(latencies) + out["errors"] < count and now < deadline:
        t0 = now
        try:
            one(family, target)
        except OSError as e:
            out["errors"] += 1
            out["last_error"] = f"{type(e).__name__}: {e}"
            if out["errors"] > 100 and not latencies:
                break
        else:
            latencies.append(time.perf_counter() - t0)
        now = time.perf_counter()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--count", type=int, default=50000)
    ap.add_argument("--parallel", type=int, default=1)
    a = ap.parse_args()
    family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    target = (a.host, a.port)
    outs = [{"latencies": [], "errors": 0, "last_error": ""} for _ in range(a.parallel)]
    start = time.perf_counter()
    deadline = start + a.seconds
    threads = [threading.Thread(target=loop, args=(family, target, a.count // a.parallel, deadline, o))
               for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies = sorted(x for o in outs for x in o["latencies"])
    errors = sum(o["errors"] for o in outs)
    ok = len(latencies)
    result = {
        "connections": ok, "errors": errors, "last_error": next((o["last_error"] for o in outs if o["last_error"]), ""),
        "seconds": elapsed, "parallel": a.parallel,
        "rate": ok / elapsed if elapsed > 0 else 0.0,
        "p50_us": latencies[len(latencies) // 2] * 1e6 if latencies else None,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6 if latencies else None,
    }
    print(json.dumps(result))
    return 0 if ok and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
