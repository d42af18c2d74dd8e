"""Which UDP socket sent a datagram: the kernel's own answer, through NETLINK_SOCK_DIAG.

The resolver knows a query only by its source address. An exact sock_diag lookup (the one
`ss` uses, udp_diag's udp_dump_one) finds the socket a reply to that address would be
delivered to, which is the socket that sent it, and gives its cookie: the key under which the
sendmsg/connect hooks filed the agent's identity (the `by_cookie` map). No extra BPF state is
needed, and connected sockets (glibc's resolver connects) are found as well as unconnected ones.

    cookie_of(resolver_addr, resolver_port, peer_addr, peer_port) -> (cookie, uid) | None

Linux inet_diag ABI (include/uapi/linux/inet_diag.h): inet_diag_req_v2 in, inet_diag_msg out.
None when there is no such socket (it closed before we looked) or udp_diag is unavailable."""

from __future__ import annotations

import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
_NOCOOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")
_COOKIE_AT = _NLMSGHDR.size + 4 + 2 + 2 + 16 + 16 + 4  # inet_diag_msg.id.idiag_cookie
_UID_AT = _NLMSGHDR.size + 4 + 48 + 12  # inet_diag_msg.idiag_uid


class SockDiag:
    """One netlink socket, reused: a lookup is one request and one reply."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        self.sock.settimeout(1.0)
        self.seq = 0

    def cookie_of(self, local: str, local_port: int, peer: str, peer_port: int) -> tuple[int, int] | None:
        """(socket cookie, owner uid) of the UDP socket bound to peer:peer_port that a datagram
        from local:local_port would reach; local is the resolver's own address."""
        six = ":" in peer
        af = socket.AF_INET6 if six else socket.AF_INET

        def addr(a: str) -> bytes:
            return socket.inet_pton(af, a.split("%")[0]).ljust(16, b"\0")

        # udp_dump_one reads idiag_src/sport as the remote end and idiag_dst/dport as the local one
        sockid = (struct.pack("!HH", local_port, peer_port) + addr(local) + addr(peer)
                  + struct.pack("=III", 0, _NOCOOKIE, _NOCOOKIE))
        req = struct.pack("=BBBBI", af, socket.IPPROTO_UDP, 0, 0, 0xFFFFFFFF) + sockid
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        try:
            self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, self.seq, 0) + req)
            while True:
                data = self.sock.recv(8192)
                if len(data) < _NLMSGHDR.size:
                    return None
                _, typ, _, seq, _ = _NLMSGHDR.unpack_from(data)
                if seq == self.seq:
                    break
        except OSError:
            return None
        if typ != SOCK_DIAG_BY_FAMILY or len(data) < _UID_AT + 4:
            return None  # NLMSG_ERROR: ENOENT (no such socket) or no udp_diag
        lo, hi = struct.unpack_from("=II", data, _COOKIE_AT)
        (uid,) = struct.unpack_from("=I", data, _UID_AT)
        return lo | hi << 32, uid

    def close(self) -> None:
        self.sock.close()
