"""Sockets a process tree opened before it was enrolled, made unable to carry a byte unjudged.

A socket's cgroup is fixed when it is created, so the BPF hooks (which run for the socket's
cgroup) and the nft backstop's `socket cgroupv2` match never see a socket opened before
enrolment, and it has no agent mark. For every inet socket the tree holds after the move:

1. take a duplicate of it (pidfd_getfd(2): the same socket, not a copy);
2. give it the instance mark (SO_MARK): from now on the nft backstop judges each of its packets
   like any agent socket's: loopback to the proxy or resolver, nothing else;
3. abort it (SOCK_DESTROY over NETLINK_SOCK_DIAG, sock_diag(7); CONFIG_INET_DIAG_DESTROY): an
   established connection gets ECONNABORTED and its unsent bytes are dropped, a listener stops.

Marking comes first, so a process that re-connects the aborted socket at once still meets the
backstop. A socket that is already an agent socket of this instance (it carries the mark) is
left alone. A socket in another network namespace than the daemon's cannot be judged by this
instance's nft table, and a socket of the tree's uid that no process holds (in flight in an
SCM_RIGHTS message, or hidden in io_uring) cannot be reached at all: either way the enrol is
refused with the list."""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
import sys
from dataclasses import asdict, dataclass

from interceptor.procinfo import pidfd_getfd

SO_MARK = 36
SO_COOKIE = 57
SO_BINDTOIFINDEX = 62
NETLINK_SOCK_DIAG = 4
SOCK_DESTROY = 21  # netlink message type (include/uapi/linux/sock_diag.h)
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
SIOCGSKNS = 0x894C  # ioctl: a file descriptor of the socket's network namespace
TCP_STATES = {1: "established", 2: "syn-sent", 3: "syn-recv", 4: "fin-wait1", 5: "fin-wait2", 6: "time-wait",
              7: "closed", 8: "close-wait", 9: "last-ack", 10: "listen", 11: "closing"}
_DESTROYABLE = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", 136: "udplite"}


@dataclass
class PreSocket:
    """One inet socket found in a process of the tree; `action` is what was done to it:
    destroyed (marked and aborted), marked (not connected or bound: nothing to abort), kept (it
    is already an agent socket of this instance) or failed (see `error`)."""

    pid: int
    fd: int
    inode: int
    proto: str
    local: str
    peer: str
    state: str
    action: str = ""
    error: str = ""

    def line(self) -> str:
        where = f"{self.local} -> {self.peer}" if self.peer else self.local
        extra = f": {self.error}" if self.error else ""
        holder = f"pid {self.pid} fd {self.fd}" if self.pid else f"inode {self.inode}"
        return f"{self.proto} {where} ({self.state}; {holder}) {self.action}{extra}"

    def as_dict(self) -> dict:
        return asdict(self)


def socket_fds(pid: int) -> dict[int, int]:
    """fd -> socket inode for every socket a process holds (from /proc/PID/fd)."""
    out = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out[int(name)] = int(link[8:-1])
    return out


def neutralise(pids: list[int], mark: int) -> list[PreSocket]:
    """Mark and abort every inet socket the processes hold that is not already this instance's.

    Each socket is handled once, whichever processes share it. Returns what was found and done,
    with action "failed" for any socket that could not be made harmless (see `unaccounted`)."""
    own_netns = os.stat("/proc/self/ns/net").st_ino
    seen: set[int] = set()  # socket inodes of the tree
    found: list[PreSocket] = []
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            for fd, inode in sorted(socket_fds(pid).items()):
                if inode in seen:
                    continue
                seen.add(inode)
                ps = _one(pidfd, pid, fd, inode, mark, own_netns)
                if ps is not None:
                    found.append(ps)
        finally:
            os.close(pidfd)
    uids = tree_uids(pids)
    return found + (unaccounted(uids, seen, mark) if uids else [])


def held_anywhere() -> set[int]:
    """Every socket inode in any process's file table on the host."""
    out: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            out.update(socket_fds(int(entry)).values())
    return out


def unaccounted(uids: set[int], held: set[int], mark: int) -> list[PreSocket]:
    """Inet sockets owned by `uids` in the daemon's network namespace that no process holds: in
    flight in an SCM_RIGHTS message, or registered with io_uring and closed. No fd reaches them,
    so they cannot be marked; an enrol that would leave them behind is refused.

    From a NETLINK_SOCK_DIAG dump (TCP and UDP, v4 and v6); `held` is what the tree holds; sockets
    with no inode (time-wait, orphans) carry no more data of the process."""
    from pyroute2 import DiagSocket
    from pyroute2.netlink.diag import SS_ALL

    candidates: dict[int, PreSocket] = {}
    with DiagSocket() as ds:
        ds.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
                for m in ds.get_sock_stats(family=family, protocol=proto, states=SS_ALL):
                    inode = m["idiag_inode"]
                    if not inode or inode in held or m["idiag_uid"] not in uids or _diag_mark(m) == mark:
                        continue
                    name = _DESTROYABLE[proto] + ("6" if family == socket.AF_INET6 else "")
                    local = _addr((m["idiag_src"], m["idiag_sport"]))
                    peer = _addr((m["idiag_dst"], m["idiag_dport"])) if m["idiag_dport"] else ""
                    state = TCP_STATES.get(m["idiag_state"], "?") if proto == socket.IPPROTO_TCP else "open"
                    candidates[inode] = PreSocket(0, -1, inode, name, local, peer, state, "failed",
                                                  f"of uid {m['idiag_uid']}, held in no process's file table "
                                                  f"(in flight over a Unix socket, or registered with io_uring)")
    if not candidates:
        return []
    everywhere = held_anywhere()
    return [ps for inode, ps in candidates.items() if inode not in everywhere]


def _diag_mark(m) -> int | None:
    raw = m.get_attr("INET_DIAG_MARK")
    if raw is None:
        return None
    if isinstance(raw, int):
        return raw
    return int.from_bytes(bytes.fromhex(str(raw).replace(":", "")), sys.byteorder)


def tree_uids(pids: list[int]) -> set[int]:
    """The real, effective, saved and filesystem uids of the processes, root left out (a root
    process is out of scope for prevention, and the kernel's own sockets are root's)."""
    uids: set[int] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        uids.update(int(x) for x in line.split()[1:])
        except OSError:
            continue
    return uids - {0}


def _one(pidfd: int, pid: int, fd: int, inode: int, mark: int, own_netns: int) -> PreSocket | None:
    try:
        dup = pidfd_getfd(pidfd, fd)
    except OSError as e:
        if e.errno == errno.EBADF:
            return None  # closed meanwhile
        return PreSocket(pid, fd, inode, "?", "?", "", "?", "failed", f"cannot take hold of it: {e.strerror}")
    try:
        s = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None
    with s:
        if s.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        ps = _describe(s, pid, fd, inode)
        if s.getsockopt(socket.SOL_SOCKET, SO_MARK) == mark:
            ps.action = "kept"  # created by an agent of this instance: hooks and backstop see it
            return ps
        try:
            ns_fd = fcntl.ioctl(s.fileno(), SIOCGSKNS)
            try:
                other_netns = os.fstat(ns_fd).st_ino != own_netns
            finally:
                os.close(ns_fd)
        except OSError as e:
            ps.action, ps.error = "failed", f"cannot tell its network namespace: {e.strerror}"
            return ps
        if other_netns:
            ps.action, ps.error = "failed", "it lives in another network namespace than the daemon's"
            return ps
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except OSError as e:
            ps.action, ps.error = "failed", f"cannot mark it: {e.strerror}"
            return ps
        ps.action = "marked"
        if s.proto in _DESTROYABLE:
            try:
                if destroy(s):
                    ps.action = "destroyed"
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    # a kernel without CONFIG_INET_DIAG_DESTROY: the mark alone holds it
                    ps.error = "SOCK_DESTROY unavailable in this kernel; the nft backstop refuses its next packet"
                else:
                    ps.action, ps.error = "failed", f"marked, but SOCK_DESTROY failed: {e.strerror}"
        return ps


def _describe(s: socket.socket, pid: int, fd: int, inode: int) -> PreSocket:
    proto = _DESTROYABLE.get(s.proto, {socket.IPPROTO_ICMP: "icmp", socket.IPPROTO_ICMPV6: "icmpv6"}.get(
        s.proto, f"ip-proto-{s.proto}"))
    if s.family == socket.AF_INET6:
        proto += "6"
    local = _addr(s.getsockname())
    try:
        peer = _addr(s.getpeername())
    except OSError:
        peer = ""
    state = "open"
    if s.proto == socket.IPPROTO_TCP:
        state = TCP_STATES.get(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0], "?")
    elif peer:
        state = "connected"
    return PreSocket(pid, fd, inode, proto, local, peer, state)


def _addr(a: tuple) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def destroy(s: socket.socket) -> bool:
    """SOCK_DESTROY for exactly this socket (its tuple and cookie). False when the kernel has no
    such socket in its tables (never bound or connected: nothing to abort).

    One request on a NETLINK_SOCK_DIAG socket: nlmsghdr + struct inet_diag_req_v2
    (include/uapi/linux/inet_diag.h), answered by an NLMSG_ERROR carrying 0 or -errno."""
    local = s.getsockname()
    try:
        peer = s.getpeername()
    except OSError:
        peer = ("::" if s.family == socket.AF_INET6 else "0.0.0.0", 0)
    try:
        ifindex = s.getsockopt(socket.SOL_SOCKET, SO_BINDTOIFINDEX)
    except OSError:
        ifindex = 0
    cookie = s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)  # two u32 words, low first (native)
    proto = s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    body = (struct.pack("=BBBxI", s.family, proto, 0, 0xFFFFFFFF)
            + struct.pack(">HH", local[1], peer[1]) + _packed(local[0]) + _packed(peer[0])
            + struct.pack("=I", ifindex) + cookie)
    msg = struct.pack("=IHHII", 16 + len(body), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.sendto(msg, (0, 0))
        reply = nl.recv(65536)
    _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
    if kind != NLMSG_ERROR:
        raise OSError(errno.EPROTO, f"unexpected netlink reply type {kind}")
    code = -struct.unpack_from("=i", reply, 16)[0]
    if code == errno.ENOENT:
        return False
    if code:
        raise OSError(code, os.strerror(code))
    return True


def _packed(addr: str) -> bytes:
    """An address as inet_diag_sockid's 16 bytes (an IPv4 address in the first four)."""
    ip = ipaddress.ip_address(addr.split("%")[0])
    return ip.packed if ip.version == 6 else ip.packed + bytes(12)
