"""HTTP and HTTPS through Interlock, against the direct path, haproxy and mitmproxy: `bench.run --only web`.

wrk on host a, nginx on host b (a certificate for b's address from the lab's own CA). Paths:

  direct     wrk → nginx
  haproxy    wrk → haproxy (mode http; TLS terminated and re-originated for HTTPS) → nginx
  mitmproxy  wrk → mitmdump in reverse mode (the equivalent of its transparent mode without
             iptables: same TLS termination, same interception of each request) → nginx
  interlock  wrk enrolled (`interlock run`), nginx's real address: captured by the cgroup hooks;
             the proxy decrypts, judges each request against a policy and records it

Three measures: keep-alive requests/s over HTTP and over HTTPS (8 connections), and new TLS
connections per second (Connection: close, so each request is one full handshake each side).

mitmproxy cannot share the project's venv (it pins older cryptography, h11 and Flask than the
project's), so it runs from a venv of its own, .venv-mitm, made on first use."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.cpu import cpu_figures
from lab.https import LabPKI, Nginx
from lab.instance import Instance
from lab.testing import stop_process, wait_listening

REPO = Path(__file__).resolve().parent.parent
MITM_VENV = REPO / ".venv-mitm"
PATHS = ("direct", "haproxy", "mitmproxy", "interlock")
# Below 10000: bench.run widens host a's ephemeral range to 10000-65000, and the web servers start
# after the other groups have run, when any port in that range may be some connection's.
PORTS = {"haproxy": (8081, 8444), "mitmproxy": (9081, 9444)}
PROXY_PORT, DNS_PORT = 6002, 6054  # an instance of its own, next to bench.run's
AGENT = "bench-web"
CONNECTIONS = 8

POLICY = """\
default: deny
targets:
  web: {{address: "{addr}", port: [80, 443]}}
rules:
  - name: no-admin
    target: web
    path: "/admin/*"
    decision: deny
  - name: web-ok
    target: web
    decision: allow
"""


@dataclass(frozen=True)
class WebBench:
    key: str
    label: str
    unit: str
    tls: bool
    close: bool  # Connection: close: one TLS handshake per request


BENCHMARKS = (
    WebBench("http_ka", "HTTP keep-alive, wrk -c8", "req/s", False, False),
    WebBench("https_ka", "HTTPS keep-alive, wrk -c8", "req/s", True, False),
    WebBench("https_hs", "TLS handshakes, wrk -c8", "conn/s", True, True),
)


def parse_wrk(out: str) -> tuple[float, int, dict]:
    """(requests/s, requests, details); errors and non-2xx answers fail the run."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rate or not total:
        raise ValueError(f"no rate in wrk output: {out[-500:]}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        raise ValueError(f"{bad.group(1)} non-2xx responses")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    detail = {"socket_errors": [int(x) for x in errors.groups()]} if errors else {}
    if errors and (int(errors.group(1)) or int(errors.group(4))):
        raise ValueError(f"wrk socket errors: {errors.group(0)}")
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    if p50:
        detail["p50"] = p50.group(1)
    return float(rate.group(1)), int(total.group(1)), detail


def mitm_venv() -> Path | None:
    """mitmdump from .venv-mitm, made on first use; None if mitmproxy cannot be installed."""
    exe = MITM_VENV / "bin" / "mitmdump"
    if exe.exists():
        return exe
    print("  installing mitmproxy into .venv-mitm (first run only) ...", flush=True)
    r = subprocess.run(["/usr/bin/python3", "-m", "venv", str(MITM_VENV)], capture_output=True, text=True)
    if r.returncode == 0:
        r = subprocess.run([str(MITM_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "mitmproxy"],
                           capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not exe.exists():
        print(f"  mitmproxy unavailable: {(r.stderr or r.stdout)[-300:]}", flush=True)
        return None
    return exe


class Web:
    """nginx, haproxy, mitmdump and an Interlock instance for the web benchmarks."""

    def __init__(self, stack: contextlib.ExitStack, a, b, tmp: Path, seconds: float, cpu_seconds):
        self.stack, self.a, self.b, self.tmp, self.seconds = stack, a, b, tmp, seconds
        self._cpu = cpu_seconds  # bench.run's, which imports this module
        self.pids: dict[str, int] = {}
        self.inst: Instance | None = None

    def setup(self) -> None:
        pki = LabPKI(self.tmp / "web-pki")
        nginx = Nginx(self.b, pki, self.tmp / "web-nginx", name=self.b.addr4)
        self.stack.callback(nginx.stop)
        self._haproxy(pki)
        self._mitm(pki)
        policy = self.tmp / "web-policy.yaml"
        policy.write_text(POLICY.format(addr=self.b.addr4))
        self.inst = Instance(self.a, f"benchweb{os.getpid() % 100000}", proxy_port=PROXY_PORT, dns_port=DNS_PORT,
                             policy=str(policy), tls_trust=str(pki.ca_file))
        self.stack.callback(self.inst.close)
        self.inst.start()

    def _haproxy(self, pki: LabPKI) -> None:
        cert, key = pki.leaf("127.0.0.1")
        pem = self.tmp / "haproxy-web.pem"
        pem.write_bytes(cert.read_bytes() + key.read_bytes())
        plain, tls = PORTS["haproxy"]
        cfg = self.tmp / "haproxy-web.cfg"
        cfg.write_text("\n".join([
            "global", "    maxconn 4000", "    nbthread 1",
            "defaults", "    mode http", "    timeout connect 5s", "    timeout client 60s", "    timeout server 60s",
            "listen web_http", f"    bind 127.0.0.1:{plain}", f"    server s {self.b.addr4}:80",
            "listen web_https", f"    bind 127.0.0.1:{tls} ssl crt {pem}",
            f"    server s {self.b.addr4}:443 ssl verify required ca-file {pki.ca_file}", ""]))
        log = open(self.tmp / "haproxy-web.log", "ab")
        self.stack.callback(log.close)
        p = self.a.popen(["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.stack.callback(stop_process, p)
        for port in PORTS["haproxy"]:
            wait_listening(self.a, port, p, self.tmp / "haproxy-web.log")
        self.pids["haproxy"] = p.pid

    def _mitm(self, pki: LabPKI) -> None:
        exe = mitm_venv()
        if exe is None:
            return
        procs = []
        for scheme, port in zip(("http", "https"), PORTS["mitmproxy"], strict=True):
            log = open(self.tmp / f"mitm-{scheme}.log", "ab")
            self.stack.callback(log.close)
            p = self.a.popen([str(exe), "-q", "--mode", f"reverse:{scheme}://{self.b.addr4}:{80 if scheme == 'http' else 443}",
                              "--listen-host", "127.0.0.1", "--listen-port", str(port),
                              "--set", f"confdir={self.tmp / 'mitm-conf'}",
                              "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_file}"],
                             stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            self.stack.callback(stop_process, p)
            wait_listening(self.a, port, p, self.tmp / f"mitm-{scheme}.log", timeout=60)
            procs.append(p)
        self.pids["mitmproxy"] = procs  # type: ignore[assignment]

    def url(self, path: str, tls: bool) -> str:
        scheme = "https" if tls else "http"
        if path in ("haproxy", "mitmproxy"):
            return f"{scheme}://127.0.0.1:{PORTS[path][int(tls)]}/small"
        return f"{scheme}://{self.b.addr4}/small"

    def proxy_cpu(self, path: str) -> float | None:
        if path == "interlock":
            return self._cpu(self.inst.status()["proxy_pid"]) if self.inst else None
        pid = self.pids.get(path)
        if isinstance(pid, list):
            vals = [self._cpu(p.pid) for p in pid]
            return None if None in vals else sum(vals)
        return self._cpu(pid) if pid else None

    def recorded(self, since: float) -> int:
        """Requests the Interlock instance recorded since `since`: proof the client was captured."""
        import sqlite3

        db = self.inst.state_dir / "recorder.db"
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
            return conn.execute("SELECT count(*) FROM events WHERE kind = 'http' AND at >= ?", (since,)).fetchone()[0]

    def measure(self, bench: WebBench, path: str, seconds: float | None = None) -> dict:
        seconds = seconds or self.seconds
        cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "--latency", *(["-H", "Connection: close"] if bench.close else []),
               self.url(path, bench.tls)]
        cpu0, since = self.proxy_cpu(path), time.time()
        if path == "interlock":
            r = self.inst.agent(cmd, agent=AGENT, timeout=seconds + 60)
        else:
            r = self.a.run(cmd, timeout=seconds + 60)
        cpu1 = self.proxy_cpu(path)
        if r.returncode != 0:
            raise RuntimeError(f"wrk via {path} failed: {(r.stderr or r.stdout)[-800:]}")
        rate, total, detail = parse_wrk(r.stdout)
        out = {"value": rate, "ops": total, **detail}
        if cpu0 is not None and cpu1 is not None:
            out.update(cpu_figures(cpu1 - cpu0, seconds, total))
        if path == "interlock":
            time.sleep(0.5)  # the last group commit
            out["recorded_requests"] = self.recorded(since)
            if not out["recorded_requests"]:
                raise RuntimeError("Interlock recorded no request: wrk was not captured")
        return out

    def run(self) -> dict[str, dict[str, dict]]:
        for path in PATHS:  # preflight: every path answers, Interlock captures
            if path == "mitmproxy" and "mitmproxy" not in self.pids:
                continue
            for b in BENCHMARKS:
                self.measure(b, path, seconds=1)
        results: dict[str, dict[str, dict]] = {}
        for b in BENCHMARKS:
            results[b.key] = {}
            for path in PATHS:
                if path == "mitmproxy" and "mitmproxy" not in self.pids:
                    continue
                print(f"  {b.label:26} {path:9} ", end="", flush=True)
                res = results[b.key][path] = self.measure(b, path)
                direct = results[b.key].get("direct", {}).get("value")
                print(f"{res['value']:,.0f} {b.unit}" + (f"  ({res['value'] / direct:.2f}x direct)" if direct and path != "direct" else ""),
                      flush=True)
        return results


def _ratio(values: dict[str, float], path: str, base: float | None) -> str:
    return f"{values[path] / base:.2f}x" if base and path in values else "-"


def table(results: dict[str, dict[str, dict]]) -> str:
    head = f"{'benchmark':26} {'unit':7}" + "".join(f" {p:>10}" for p in PATHS) + \
        f"   {'haproxy/d':>9} {'mitm/d':>7} {'interlock/d':>11} {'interlock/mitm':>14}"
    lines = [head, "-" * len(head)]
    for b in BENCHMARKS:
        res = results.get(b.key)
        if not res:
            continue
        v = {p: res[p]["value"] for p in PATHS if p in res}
        d = v.get("direct")

        cells = [_ratio(v, p, d) for p in ("haproxy", "mitmproxy", "interlock")] + [_ratio(v, "interlock", v.get("mitmproxy"))]
        lines.append(f"{b.label:26} {b.unit:7}" + "".join(f" {v[p]:>10,.0f}" if p in v else f" {'-':>10}" for p in PATHS)
                     + f"   {cells[0]:>9} {cells[1]:>7} {cells[2]:>11} {cells[3]:>14}")
    lines += ["", f"{'proxy CPU, us/request':26}" + "".join(f" {p:>10}" for p in PATHS[1:])]
    for b in BENCHMARKS:
        res = results.get(b.key, {})
        lines.append(f"{b.label:26}" + "".join(f" {res[p].get('proxy_cpu_us_per_op', '-')!s:>10}" if p in res else f" {'-':>10}"
                                               for p in PATHS[1:]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit("run through bench.run: python -m bench.run --only web")
