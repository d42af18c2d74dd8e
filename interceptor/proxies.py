"""The daemon's proxy workers: `workers` processes of proxy.server sharing the listeners.

Each worker says "ready" on a pipe once it listens, then writes its recorder's state there as
JSON lines (proxy/server.py). The daemon starts worker 0 alone first (it creates the
interception CA and the trust bundles), then the others; a worker that exits is recorded and
started again after `proxy_restart_delay`, and its successor closes out the sessions it left
open (their ids name their worker: recorder.store.new_session_id). While no worker listens,
an agent's redirected connect finds a closed loopback port: refused, never sent direct."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class StartError(RuntimeError):
    pass


@dataclass
class Worker:
    index: int
    popen: subprocess.Popen | None = None
    pipe: int | None = None  # "ready", then the worker's recorder state
    recorder: dict | None = None  # its latest state
    restart_at: float | None = None  # monotonic: when to start it again after it exited
    rest: bytes = field(default=b"", repr=False)

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def start(self, cmd: Callable[[int], list[str]]) -> None:
        """Start this worker (cmd: its command line given the ready pipe's fd) and wait for its
        "ready" (raises StartError if it never comes)."""
        r, w = os.pipe()
        try:
            self.popen = subprocess.Popen(cmd(w), pass_fds=(w,), stdin=subprocess.DEVNULL)
        finally:
            os.close(w)
        self.close_pipe()
        self.pipe, self.recorder, self.rest = r, None, b""
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(r, 1)  # byte by byte: what follows "ready" is the worker's state
            if not chunk:
                break
            line += chunk
        os.set_blocking(r, False)
        if line.strip() != b"ready":
            code = self.popen.wait(timeout=5)
            raise StartError(f"proxy worker {self.index} failed to start (exit {code}); see the messages above")

    def read_state(self) -> None:
        """The worker's latest recorder state from its pipe."""
        if self.pipe is None:
            return
        data = b""
        try:
            while chunk := os.read(self.pipe, 65536):
                data += chunk
        except BlockingIOError:
            pass
        except OSError:
            return
        *lines, self.rest = (self.rest + data).split(b"\n")
        for line in lines:
            try:
                self.recorder = json.loads(line)["recorder"]
            except (ValueError, KeyError, TypeError):
                continue

    def close_pipe(self) -> None:
        if self.pipe is not None:
            os.close(self.pipe)
            self.pipe = None


def command(index: int, workers: int, ready_fd: int, config_source: str | None,
            state_dir: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "proxy.server", "--ready-fd", str(ready_fd),
           "--worker", str(index), "--workers", str(workers)]
    if config_source:
        cmd += ["--config", config_source]
    if state_dir is not None:
        cmd += ["--state-dir", str(state_dir)]
    return cmd


def combined_recorder(workers: list[Worker]) -> dict:
    """One recorder state for status: failed while any worker's recorder is; counters summed."""
    states = [w.recorder for w in workers if w.recorder]
    if not states:
        return {}
    failed = next((s for s in states if s.get("failed")), None)
    out = dict(failed or states[0])
    for key in ("failures", "refused", "dropped", "backlog"):
        out[key] = sum(int(s.get(key) or 0) for s in states)
    out["workers"] = {str(w.index): w.recorder for w in workers if w.recorder}
    return out


def ports_free(ports: list[tuple[int, int]], hosts: tuple[str, ...] = ("127.0.0.1", "::1")) -> tuple[int, str] | None:
    """None when nothing is bound to these loopback ports ((socket type, port)), else the port
    and what is in the way. Workers share their ports (SO_REUSEPORT), which would also let them share one with
    another root process that set it: the daemon checks, with sockets that share nothing, before
    it starts a group."""
    for host in hosts:
        for kind, port in ports:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            what = "TCP" if kind == socket.SOCK_STREAM else "UDP"
            try:
                s = socket.socket(family, kind)
            except OSError:
                continue
            try:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if kind == socket.SOCK_STREAM:  # past connections in TIME_WAIT are no listener
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return port, f"{what} {host} port {port} is in use"
                if e.errno == errno.EADDRNOTAVAIL and ":" in host:
                    continue  # no IPv6 loopback here
                return port, f"{what} {host} port {port}: {e.strerror or e}"
            finally:
                s.close()
    return None
