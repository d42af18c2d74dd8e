"""The daemon's control socket: one JSON request per connection, one JSON reply.

Unix socket in the run dir; the peer's credentials (SO_PEERCRED) decide what it may ask."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path


class DaemonUnavailable(RuntimeError):
    pass


def request(path: Path, op: str, timeout: float = 30.0, **args) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except OSError as e:
        s.close()
        raise DaemonUnavailable(f"no daemon answers at {path} ({e.strerror})") from None
    with s:
        s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise DaemonUnavailable(f"the daemon at {path} closed the connection without answering")
    return json.loads(buf)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)
