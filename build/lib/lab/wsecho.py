"""A WebSocket echo server (RFC 6455, text frames, no extensions) for the server host, and the
client side of one exchange, for tests of HTTP upgrades through the proxy.

`python -m lab.wsecho serve PORT` answers the opening handshake and echoes each frame's payload in
an unmasked frame of the same opcode. `python -m lab.wsecho client URL TEXT` (ws:// or wss://,
trusting SSL_CERT_FILE) prints the echoed text, or exits non-zero."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import ssl
import sys
from urllib.parse import urlsplit

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: bytes) -> str:
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest()).decode()


def frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    head += bytes([bit | n]) if n < 126 else bytes([bit | 126]) + n.to_bytes(2, "big") if n < 65536 else \
        bytes([bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def parse(buf: bytes) -> tuple[int, bytes, int] | None:
    """(opcode, payload, frame length) of the first whole frame in buf, or None."""
    if len(buf) < 2:
        return None
    opcode, n, masked, pos = buf[0] & 0x0F, buf[1] & 0x7F, buf[1] & 0x80, 2
    if n == 126:
        n, pos = int.from_bytes(buf[2:4], "big"), 4
    elif n == 127:
        n, pos = int.from_bytes(buf[2:10], "big"), 10
    key = b""
    if masked:
        key, pos = buf[pos:pos + 4], pos + 4
    if len(buf) < pos + n:
        return None
    payload = buf[pos:pos + n]
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return opcode, payload, pos + n


async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    key = next((line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key:")), None)
    if key is None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        writer.close()
        return
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n\r\n")
    buf = b""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        buf += data
        while (f := parse(buf)) is not None:
            opcode, payload, used = f
            buf = buf[used:]
            writer.write(frame(opcode, payload, mask=False))
            if opcode == 8:
                writer.close()
                return
    writer.close()


def client(url: str, text: str) -> int:
    u = urlsplit(url)
    port = u.port or (443 if u.scheme == "wss" else 80)
    sock = socket.create_connection((u.hostname, port), timeout=10)
    if u.scheme == "wss":
        sock = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE")).wrap_socket(sock, server_hostname=u.hostname)
    key = base64.b64encode(os.urandom(16))
    sock.sendall(f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            print(f"closed during the handshake: {buf[:200]!r}", file=sys.stderr)
            return 1
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101") or accept_key(key).encode() not in head:
        print(f"no upgrade: {head[:300]!r}", file=sys.stderr)
        return 1
    sock.sendall(frame(1, text.encode(), mask=True))
    while (f := parse(buf)) is None:
        chunk = sock.recv(65536)
        if not chunk:
            return 1
        buf += chunk
    print(f[1].decode())
    sock.sendall(frame(8, b"", mask=True))
    return 0


def main(argv: list[str]) -> int:
    if argv[0] == "client":
        return client(argv[1], argv[2])

    async def run() -> None:
        server = await asyncio.start_server(serve_one, "::", int(argv[1]))
        print("ready", flush=True)
        await server.serve_forever()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
