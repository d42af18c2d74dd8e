"""Recover, for an accepted connection, where the agent meant to go and who the agent is.

The sock_ops hook filed that under the agent socket's local endpoint, which is the proxy's
peer address; the entry is taken (read and deleted) once."""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path

from interceptor.bpf_loader import PinnedMap
from interceptor.bpf_types import AF_INET6, Endpoint, Origin


@dataclass(frozen=True)
class Identity:
    agent_id: int
    tgid: int
    pid: int
    uid: int
    gid: int
    comm: str
    cgroup_id: int
    exe: str
    cmdline: str


@dataclass(frozen=True)
class Destination:
    host: str
    port: int
    family: str  # "ipv4" or "ipv6", as the agent asked


_PROC_CACHE: dict[tuple[int, bytes], tuple[float, str, str]] = {}
_PROC_TTL = 60.0


def _proc(tgid: int, comm: bytes) -> tuple[str, str]:
    """exe and cmdline of a process, remembered a minute by (tgid, comm): comm changes at exec,
    so a process that execs is read again, and a record swept after exit still names it."""
    now = time.monotonic()
    hit = _PROC_CACHE.get((tgid, comm))
    if hit and now - hit[0] < _PROC_TTL:
        return hit[1], hit[2]
    exe, cmdline = _read_proc(tgid)
    if exe:
        if len(_PROC_CACHE) > 4096:
            _PROC_CACHE.clear()
        _PROC_CACHE[(tgid, comm)] = (now, exe, cmdline)
    return exe, cmdline


def _read_proc(tgid: int) -> tuple[str, str]:
    try:
        exe = os.readlink(f"/proc/{tgid}/exe")
    except OSError:
        exe = ""
    try:
        with open(f"/proc/{tgid}/cmdline", "rb") as f:
            cmdline = f.read(4096).replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmdline = ""
    return exe, cmdline


class Origins:
    def __init__(self, pin_dir: Path):
        self.map = PinnedMap(pin_dir / "by_peer")
        self.by_cookie = PinnedMap(pin_dir / "by_cookie")

    def take(self, peer_host: str, peer_port: int) -> tuple[Destination, Identity] | None:
        return self._take(Endpoint.of(peer_host, peer_port))

    def _take(self, key: Endpoint) -> tuple[Destination, Identity] | None:
        o = Origin()
        if not self.map.take(key, o):
            return None
        return _decode(o)

    def of_socket(self, cookie: int) -> tuple[Destination, Identity] | None:
        """What the hooks filed for a live agent socket (a UDP one: DNS), by its cookie; read,
        not taken: the socket may send again. None for a socket no hook redirected."""
        o = Origin()
        if not self.by_cookie.lookup(ctypes.c_uint64(cookie), o):
            return None
        return _decode(o)

    def stale(self, max_age: float) -> list[tuple[Destination, Identity]]:
        """Records no accept ever took: the agent reset the connection before the proxy got to it.
        They are still sessions, and are recorded as such."""
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        out = []
        for key in self.map.keys(Endpoint):
            o = Origin()
            if self.map.lookup(key, o) and now_ns - o.created_ns > max_age * 1e9:
                if self.map.delete(key):
                    out.append(_decode(o))
        return out


def _decode(o: Origin) -> tuple[Destination, Identity]:
    exe, cmdline = _proc(o.tgid, o.comm)
    ident = Identity(o.agent_id, o.tgid, o.pid, o.uid, o.gid,
                     o.comm.decode(errors="replace"), o.cgroup_id, exe, cmdline)
    dest = Destination(o.dst.address(), o.dst.port, "ipv6" if o.family == AF_INET6 else "ipv4")
    return dest, ident
