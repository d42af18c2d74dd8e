"""Shared pieces of the datapath tests: an echo server that logs what reached it, unique
instance names, and polling with a deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lab.netns import Host

ECHO_PORT = 7000


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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
