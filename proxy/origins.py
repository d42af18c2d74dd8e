"""Recover, for an accepted connection, where the agent meant to go and who the agent is.

The sock_ops hook filed that under the agent socket's local endpoint, which is the proxy's
peer address; the entry is taken (read and deleted) once."""

from __future__ import annotations

import os
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


def _proc(tgid: int) -> tuple[str, str]:
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

    def take(self, peer_host: str, peer_port: int) -> tuple[Destination, Identity] | None:
        key = Endpoint.of(peer_host, peer_port)
        o = Origin()
        if not self.map.lookup(key, o):
            return None
        self.map.delete(key)
        exe, cmdline = _proc(o.tgid)
        ident = Identity(o.agent_id, o.tgid, o.pid, o.uid, o.gid,
                         o.comm.decode(errors="replace"), o.cgroup_id, exe, cmdline)
        dest = Destination(o.dst.address(), o.dst.port, "ipv6" if o.family == AF_INET6 else "ipv4")
        return dest, ident
