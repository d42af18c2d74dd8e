"""Shared pieces of the datapath tests, the demo and the benchmarks: an echo server that logs
what reached it, unique instance names, polling with a deadline, waiting for a server to listen
and stopping one by its PID."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from lab.netns import Host

ECHO_PORT = 7000
# Wall-clock bounds in tests are multiplied by this. Kernel-matrix guests run under software
# emulation (INTERLOCK_EMULATED is set there), where a CLI call takes ~25x longer than here.
SLOWDOWN = float(os.environ.get("INTERLOCK_TEST_SLOWDOWN") or (10 if os.environ.get("INTERLOCK_EMULATED") else 1))


class EchoServer:
    """lab.echo_server on a host; `seen()` lists what reached it."""

    def __init__(self, host: Host, port: int, log: Path):
        self.host, self.port, self.log = host, port, log
        self.proc = host.popen([sys.executable, "-m", "lab.echo_server", str(log), str(port)],
                               stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "ready" not in line:
            raise RuntimeError("echo server did not start")

    def seen(self, proto: str | None = None) -> list[dict]:
        if not self.log.exists():
            return []
        rows = [json.loads(x) for x in self.log.read_text().splitlines() if x.strip()]
        return [r for r in rows if proto is None or r["proto"] == proto]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


_instances = iter(range(10**6))


def instance_name(tag: str) -> str:
    return f"t{os.getpid() % 100000}{tag}{next(_instances)}"


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll until `predicate` is truthy or the deadline (scaled by SLOWDOWN) passes."""
    deadline = time.monotonic() + timeout * SLOWDOWN
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def wait_listening(host: Host, port: int, proc: subprocess.Popen, log: Path | None = None,
                   timeout: float = 20) -> None:
    """Return once something listens on port in host's namespace; fail if proc exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
            raise RuntimeError(f"the server for port {port} exited {proc.returncode}: {tail}")
        if host.run(["ss", "-Hltn", f"sport = :{port}"]).stdout.strip():
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} in {host.name} after {timeout}s")


def stop_process(p: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate one process we started, by its PID; kill it if it does not go."""
    if p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)


def default_policy_plus_opaque(addresses: list[str], ports: list[int]) -> str:
    """The embedded default policy, plus an allow for servers whose bytes are no protocol
    Interlock reads (iperf3, the echo server's random bulk data): the default refuses those
    (docs/POLICY.md, "Connections Interlock cannot read"), a catch-all allow for their target
    says they may be relayed unread."""
    from policy.engine import EMBEDDED_DEFAULT

    doc = yaml.safe_load(EMBEDDED_DEFAULT.read_text())
    doc["targets"] = {"opaque-services": {"cidr": list(addresses), "port": list(ports)}}
    doc["rules"].insert(0, {"name": "opaque-services", "target": "opaque-services", "decision": "allow"})
    return yaml.safe_dump(doc, sort_keys=False)

