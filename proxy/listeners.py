"""Which local socket an inbound connection was meant for, and who owns it.

The proxy's inbound listener receives connections that nftables diverted (`tproxy`) away from an
agent's listening socket; the accepted socket keeps the original destination as its local address.
This module asks the kernel for the TCP listeners on that port (sock_diag, `inet_diag_req_v2`
dump, linux/inet_diag.h) with their inode, uid, mark and cgroup id (INET_DIAG_CGROUP_ID, kernel
≥ 5.7), picks the one the kernel would have delivered to, and finds the process holding it by
its socket inode under /proc. Parsing is separate from the socket (`parse_dump`), so it is tested
on bytes."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
INET_DIAG_MARK, INET_DIAG_SKV6ONLY, INET_DIAG_CGROUP_ID = 15, 11, 21
_NLMSG = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI48s")
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")  # inet_diag_msg: ports and addresses big-endian
_ATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket. `address` is as bound ("0.0.0.0", "::", "::ffff:a.b.c.d" …)."""

    family: int
    address: str
    port: int
    uid: int
    inode: int
    mark: int = 0
    cgroup_id: int = 0
    v6only: bool = False


def request(family: int) -> bytes:
    """The dump request for every TCP listener of one address family."""
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN, b"\0" * 48)
    return _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body


def parse_dump(data: bytes) -> tuple[list[Listener], bool]:
    """Listeners in one read of the dump, and whether the dump is finished (NLMSG_DONE or error)."""
    out: list[Listener] = []
    off, done = 0, False
    while off + _NLMSG.size <= len(data):
        length, kind, _, _, _ = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or off + length > len(data):
            return out, True  # truncated: treat as the end rather than read garbage
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            done = True
        elif kind == SOCK_DIAG_BY_FAMILY and length >= _NLMSG.size + _MSG.size:
            out.append(_listener(data[off + _NLMSG.size: off + length]))
        off += (length + 3) & ~3
    return out, done


def _listener(msg: bytes) -> Listener:
    family, _, _, _, sport, _, src, _, _, _, _, _, _, uid, inode = _MSG.unpack_from(msg)
    raw = src[:4] if family == socket.AF_INET else src
    attrs = dict(_attrs(msg[_MSG.size:]))
    mark = attrs.get(INET_DIAG_MARK, b"")
    cgroup = attrs.get(INET_DIAG_CGROUP_ID, b"")
    v6only = attrs.get(INET_DIAG_SKV6ONLY, b"")
    return Listener(family, str(ipaddress.ip_address(raw)), int.from_bytes(sport, "big"), uid, inode,
                    struct.unpack("=I", mark[:4])[0] if len(mark) >= 4 else 0,
                    struct.unpack("=Q", cgroup[:8])[0] if len(cgroup) >= 8 else 0,
                    bool(v6only[:1] == b"\1"))


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    off = 0
    while off + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, off)
        if length < _ATTR.size:
            return
        yield kind & 0x3FFF, data[off + _ATTR.size: off + length]
        off += (length + 3) & ~3


def listeners(port: int) -> list[Listener]:
    """Every TCP listener on `port` in this network namespace, IPv4 and IPv6."""
    found: list[Listener] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        for family in (socket.AF_INET, socket.AF_INET6):
            nl.sendall(request(family))
            while True:
                batch, done = parse_dump(nl.recv(1 << 16))
                found.extend(x for x in batch if x.port == port)
                if done:
                    break
    return found


def chosen(candidates: Iterable[Listener], local_addr: str, is_agent) -> Listener | None:
    """The agent listener a connection to `local_addr` was meant for: an address bound exactly
    beats a wildcard, an IPv4 socket beats a dual-stack one for IPv4 (as the kernel scores them).
    Only sockets `is_agent(listener)` accepts count: nftables diverted the connection because
    the kernel's own choice was an agent socket."""
    ip = ipaddress.ip_address(local_addr)
    v4 = ip.version == 4 or (ip.version == 6 and ip.ipv4_mapped is not None)
    want4 = str(ip if ip.version == 4 else ip.ipv4_mapped) if v4 else None
    best, best_score = None, -1
    for x in candidates:
        if not is_agent(x):
            continue
        bound = ipaddress.ip_address(x.address)
        if x.family == socket.AF_INET:
            if not v4:
                continue
            score = 3 if str(bound) == want4 else 1 if bound.is_unspecified else -1
            score += 1 if score >= 0 else 0
        else:
            if v4:
                if x.v6only:
                    continue
                mapped = bound.ipv4_mapped
                score = 3 if mapped is not None and str(mapped) == want4 else 1 if bound.is_unspecified else -1
            else:
                score = 3 if bound == ip else 1 if bound.is_unspecified else -1
        if score > best_score:
            best, best_score = x, score
    return best if best_score >= 0 else None


def holder(inode: int, pids: Iterable[int]) -> int | None:
    """The first of `pids` with the socket inode among its open files."""
    target = f"socket:[{inode}]"
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in names:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def cgroup_dirs(root: Path) -> Iterator[tuple[int, Path]]:
    """(cgroup id, path) of root and every cgroup below it: a cgroup's id is its inode number."""
    for dirpath, _, _ in os.walk(root):
        try:
            yield os.stat(dirpath).st_ino, Path(dirpath)
        except OSError:
            continue
