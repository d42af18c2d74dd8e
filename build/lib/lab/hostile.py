"""A misbehaving agent for the robustness tests: garbage, resets, silence, floods, half-closes.

`python -m lab.hostile HOST PORT` runs every trick against one destination and prints how many
connections it opened and its pid; what matters is that the proxy is still up and recording afterwards."""

from __future__ import annotations

import os
import random
import socket
import struct
import sys
import time


def conn(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port), timeout=5)
    return s


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    rnd = random.Random(1234)
    opened = 0
    tricks = [
        lambda s: s.sendall(os.urandom(4096)),
        lambda s: s.sendall(b"\x16\x03\x01\xff\xff" + os.urandom(50)),  # a TLS record that lies about its length
        lambda s: s.sendall(struct.pack("!I", 8) + struct.pack("!I", 80877103)),  # PostgreSQL SSLRequest
        lambda s: s.sendall(b"*99999999\r\n$-7\r\n"),  # RESP with absurd counts
        lambda s: s.sendall(b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 65536 + b"\r\n\r\n"),
        lambda s: s.shutdown(socket.SHUT_WR),  # half-close before a byte
        lambda s: None,  # silence, then close
        lambda s: s.sendall(os.urandom(1 << 20)),  # a flood
    ]
    for i in range(40):
        try:
            s = conn(host, port)
            opened += 1
            tricks[i % len(tricks)](s)
            if rnd.random() < 0.5:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
            s.close()
        except OSError:
            pass
    time.sleep(0.5)
    print(opened, os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
