"""The daemon's control socket: one JSON request per connection, one JSON reply.

Unix socket in the run dir, open to every local user so that every request is answered and a
refused one is recorded; what a caller may ask is decided by the daemon from the kernel's word
about the peer (SO_PEERCRED, SO_PEERGROUPS: fixed when the client connected), never from what
the request says. A request about a process carries a pidfd of it (SCM_RIGHTS), so the daemon
reads the process's identity in its own PID namespace whatever namespace the client is in."""

from __future__ import annotations

import array
import json
import socket
import struct
from pathlib import Path

SO_PEERGROUPS = 59  # asm-generic/socket.h, Linux 4.13
MAX_REQUEST = 65536
MAX_FDS = 4


class DaemonUnavailable(RuntimeError):
    pass


def request(path: Path, op: str, timeout: float = 30.0, fds: tuple[int, ...] = (), **args) -> dict:
    """Send one request (with `fds` attached as SCM_RIGHTS) and return the daemon's reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except OSError as e:
        s.close()
        raise DaemonUnavailable(f"no daemon answers at {path} ({e.strerror})") from None
    with s:
        data = json.dumps({"op": op, **args}).encode() + b"\n"
        if fds:
            socket.send_fds(s, [data], list(fds))
        else:
            s.sendall(data)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise DaemonUnavailable(f"the daemon at {path} closed the connection without answering")
    return json.loads(buf)


def receive(sock: socket.socket) -> tuple[dict, list[int]]:
    """One request line and the file descriptors that came with it (the caller closes them).

    Raises ValueError for a request that is not one JSON object under MAX_REQUEST bytes."""
    buf, fds = b"", []
    while not buf.endswith(b"\n") and len(buf) < MAX_REQUEST:
        data, got, _, _ = socket.recv_fds(sock, MAX_REQUEST, MAX_FDS)
        fds.extend(got)
        if not data:
            break
        buf += data
    try:
        req = json.loads(buf or b"{}")
    except ValueError:
        for fd in fds:
            _close(fd)
        raise
    if not isinstance(req, dict):
        for fd in fds:
            _close(fd)
        raise ValueError("a request is one JSON object")
    return req, fds


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as of its connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def peer_groups(sock: socket.socket) -> list[int]:
    """The peer's supplementary groups as of its connect() (SO_PEERGROUPS)."""
    size = 64
    while size <= 65536:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size * 4)
        except OSError as e:
            if e.errno == 34:  # ERANGE: more groups than the buffer holds
                size *= 4
                continue
            return []
        return list(array.array("I", raw))
    return []


def _close(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
