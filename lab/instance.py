"""A real Interlock instance on a lab host: its own state dir, cgroup root, nft table and ports."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from interceptor.cgroups import cgroup2_mount
from lab.netns import Host
from lab.testing import SLOWDOWN

INTERLOCK = [sys.executable, "-m", "interceptor.cli"]


class Instance:
    DEFAULTS: dict = {}  # config every instance gets unless given (bench.run --workers sets workers)

    def __init__(self, host: Host, name: str, proxy_port: int = 15001, dns_port: int = 15053, **config):
        self.host = host
        self.name = name
        self.state_dir = Path(tempfile.mkdtemp(prefix=f"interlock-{name}-"))
        self.config = {"instance": name, "cgroup_root": f"interlock-lab-{name}",
                       "proxy_port": proxy_port, "dns_port": dns_port, **self.DEFAULTS, **config}
        self.config_file = self.state_dir / "config.yaml"
        self.daemon: subprocess.Popen | None = None
        self.log = self.state_dir / "daemon.log"

    @property
    def cgroup_root(self) -> Path:
        return cgroup2_mount() / self.config["cgroup_root"]

    def start(self, timeout: float = 120) -> Instance:
        self.config_file.write_text(yaml.safe_dump(self.config))
        offset = self.log.stat().st_size if self.log.exists() else 0
        log = open(self.log, "ab")
        self.daemon = self.host.popen([*INTERLOCK, "daemon", "--state-dir", str(self.state_dir),
                                       "--config", str(self.config_file)],
                                      stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout * SLOWDOWN  # a bcc compile under emulation takes minutes
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"daemon exited {self.daemon.returncode}: {self.log.read_text()[-3000:]}")
            if b"ready, proxy on port" in self.log.read_bytes()[offset:]:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"daemon not ready after {timeout}s: {self.log.read_text()[-3000:]}")

    def cli(self, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return self.host.run([*INTERLOCK, args[0], "--state-dir", str(self.state_dir), *args[1:]],
                             timeout=timeout, **kw)

    def agent(self, cmd: list[str], agent: str = "bot", **kw) -> subprocess.CompletedProcess:
        return self.cli("run", "--agent", agent, "--", *cmd, **kw)

    def probe(self, *args: str, agent: str | None = "bot") -> dict:
        """Run lab.probe as an agent (or un-enrolled with agent=None); its JSON result."""
        cmd = [sys.executable, "-m", "lab.probe", *args]
        r = self.agent(cmd, agent=agent) if agent else self.host.run(cmd)
        try:
            return json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return {"ok": False, "error": "no result", "stdout": r.stdout, "stderr": r.stderr}

    def sessions(self, agent: str | None = None) -> list[dict]:
        args = ["sessions", "--json"] + (["--agent", agent] if agent else [])
        return json.loads(self.cli(*args).stdout)

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def events(self, kind: str | None = None) -> list[dict]:
        from recorder.store import read_events

        return read_events(self.state_dir / "recorder.db", kind)

    def diagnosis(self, log_chars: int = 4000) -> str:
        """What a failed assertion should carry, since a guest's run leaves nothing else behind:
        the status, the last sessions and events, and the daemon log's tail (workers log there)."""
        parts = []
        for what, get in (("status", self.status), ("sessions", lambda: self.sessions()[-5:]),
                          ("events", lambda: [e for e in self.events() if e["kind"] != "enrolled"][-12:])):
            try:
                parts.append(f"{what}: {json.dumps(get(), default=str)}")
            except (OSError, ValueError, sqlite3.Error, subprocess.SubprocessError) as e:
                parts.append(f"{what}: unavailable ({e})")
        try:
            parts.append("daemon log:\n" + self.log.read_text(errors="replace")[-log_chars:])
        except OSError as e:
            parts.append(f"daemon log: unavailable ({e})")
        return "\n".join(parts)

    @staticmethod
    def wait_for(predicate, timeout: float = 10, interval: float = 0.1):
        from lab.testing import wait_until

        return wait_until(predicate, timeout, interval)

    def down(self) -> subprocess.CompletedProcess:
        r = self.cli("down", "--config", str(self.config_file))
        if self.daemon is not None:
            try:
                self.daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
        return r

    def close(self) -> None:
        """Tear down whatever state the test left, also after a failure."""
        try:
            self.down()
        finally:
            if self.daemon is not None and self.daemon.poll() is None:
                self.daemon.kill()
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Instance:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def leftovers(inst: Instance) -> list[str]:
    """Anything of this instance still on the host (what `interlock down` must remove)."""
    out = []
    if inst.cgroup_root.exists():
        out.append(f"cgroup {inst.cgroup_root}")
    pins = Path("/sys/fs/bpf/interlock") / inst.name
    if pins.exists():
        out.append(f"pins {pins}")
    table = "interlock" if inst.name == "default" else f"interlock-{inst.name}"
    r = inst.host.run(["nft", "list", "tables"])
    if table in r.stdout.split():
        out.append(f"nft table {table}")
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(inst.state_dir).encode() in cmd and int(pid) != os.getpid():
                out.append(f"process {pid}")
    return out
