"""Slow, stalling and hoarding agents for the adversarial tests (issue 9, holes 4 and 11).

Each mode prints one JSON line; the tests read it. Every send is its own TCP segment (NODELAY),
so "one byte, a pause, the rest" reaches the proxy as separate reads, as an attacker would send it.

    python -m lab.slow send HOST PORT HEX [--dribble N] [--pause S] [--wait S]
        N bytes one at a time, S seconds apart, then the rest; read the answer for up to --wait s.
    python -m lab.slow pg HOST PORT SQL [--dribble N] [--pause S] [--wait S]
        a PostgreSQL startup packet sent the same way (user postgres, database postgres), then SQL
        as a simple Query; the server's messages as [type, text] pairs.
    python -m lab.slow tls HOST PORT SNI PATH [--dribble N] [--pause S]
        a real TLS handshake (trusting $SSL_CERT_FILE) whose ClientHello is dribbled, then GET PATH.
    python -m lab.slow hello HOST PORT SNI_HEX
        a ClientHello carrying that server_name as raw bytes; what came back (an alert?), how it ended.
    python -m lab.slow hoard HOST PORT COUNT [--push KB] [--trickle S] [--hold S]
        open COUNT connections, push KB into each (non-blocking, until the proxy stops reading) or
        trickle one byte of an HTTP request head per S seconds, keep them --hold s; how each ended.
    python -m lab.slow connect HOST PORT [--send]
        one connect, optionally a send, then a read: what the client sees and when (closed ports).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import ssl
import struct
import sys
import time


def _conn(host: str, port: int, timeout: float) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(timeout)
    s.connect((host, port))
    return s


def _dribble(s: socket.socket, data: bytes, n: int, pause: float) -> None:
    for i in range(min(n, len(data))):
        s.sendall(data[i:i + 1])
        time.sleep(pause)
    if len(data) > n:
        s.sendall(data[n:])


def _read(s: socket.socket, wait: float) -> tuple[bytes, str]:
    """Everything until EOF, a reset or `wait` seconds: the bytes and how it ended."""
    got = bytearray()
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(got), "timeout"
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            return bytes(got), "timeout"
        except OSError as e:
            return bytes(got), errno.errorcode.get(e.errno or 0, str(e))
        if not chunk:
            return bytes(got), "eof"
        got += chunk


def _fail(e: OSError) -> dict:
    return {"ok": False, "error": type(e).__name__, "errno": errno.errorcode.get(e.errno or 0, str(e.errno))}


def send(a) -> dict:
    try:
        s = _conn(a.host, a.port, 10)
        _dribble(s, bytes.fromhex(a.data), a.dribble, a.pause)
    except OSError as e:
        return _fail(e)
    got, end = _read(s, a.wait)
    return {"ok": bool(got), "received": got[:2000].decode("latin-1"), "end": end}


def _pg_messages(buf: bytes) -> list[list[str]]:
    out = []
    while len(buf) >= 5:
        kind, size = buf[:1].decode("latin-1"), struct.unpack("!I", buf[1:5])[0]
        body = buf[5:1 + size]
        out.append([kind, body.replace(b"\x00", b" ").decode("latin-1", "replace")[:300]])
        buf = buf[1 + size:]
    return out


def pg(a) -> dict:
    body = struct.pack("!I", 196608) + b"user\x00postgres\x00database\x00postgres\x00\x00"
    startup = struct.pack("!I", len(body) + 4) + body
    try:
        s = _conn(a.host, a.port, 10)
        _dribble(s, startup, a.dribble, a.pause)
        buf = bytearray()
        while b"Z\x00\x00\x00\x05" not in buf:  # ReadyForQuery
            s.settimeout(a.wait)
            chunk = s.recv(65536)
            if not chunk:
                return {"ok": False, "phase": "startup", "messages": _pg_messages(bytes(buf)), "end": "eof"}
            buf += chunk
        sql = a.data.encode() + b"\x00"
        s.sendall(b"Q" + struct.pack("!I", len(sql) + 4) + sql)
    except TimeoutError:
        return {"ok": False, "phase": "startup", "end": "timeout"}
    except OSError as e:
        return _fail(e)
    got, end = _read(s, a.wait)
    msgs = _pg_messages(got)
    return {"ok": any(m[0] == "C" for m in msgs), "messages": msgs, "end": end}


def tls(a) -> dict:
    ctx = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE"))
    ctx.set_alpn_protocols(["http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=a.sni)
    try:
        s = _conn(a.host, a.port, 10)
        first = True
        while True:
            try:
                obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            out = outgoing.read()
            if out:
                if first:
                    _dribble(s, out, a.dribble, a.pause)  # the ClientHello, in pieces
                    first = False
                else:
                    s.sendall(out)
            if done:
                break
            chunk = s.recv(65536)
            if not chunk:
                return {"ok": False, "phase": "handshake", "end": "eof"}
            incoming.write(chunk)
        obj.write(f"GET {a.path} HTTP/1.1\r\nHost: {a.sni}\r\nConnection: close\r\n\r\n".encode())
        s.sendall(outgoing.read())
        plain = bytearray()
        end = "eof"
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            incoming.write(chunk)
            try:
                while True:
                    piece = obj.read(65536)
                    if not piece:
                        break
                    plain += piece
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                break
    except ssl.SSLError as e:
        return {"ok": False, "error": "SSLError", "reason": e.reason or str(e)}
    except OSError as e:
        return _fail(e)
    text = plain.decode("latin-1")
    status = int(text.split(" ", 2)[1]) if text.startswith("HTTP/") else 0
    return {"ok": status == 200, "status": status, "body": text[-300:], "end": end}


def client_hello(sni: bytes) -> bytes:
    """A TLS ClientHello record (RFC 8446 §4.1.2) with one host_name entry of these exact bytes."""
    def ext(t: int, b: bytes) -> bytes:
        return struct.pack("!HH", t, len(b)) + b
    sni_ext = ext(0, struct.pack("!HBH", len(sni) + 3, 0, len(sni)) + sni)
    sigalgs = ext(13, b"\x00\x0a\x04\x03\x08\x04\x04\x01\x05\x03\x08\x07")
    key_share = ext(51, b"\x00\x24\x00\x1d\x00\x20" + os.urandom(32))  # x25519
    exts = sni_ext + ext(16, b"\x00\x09\x08http/1.1") + ext(43, b"\x04\x03\x04\x03\x03") + \
        ext(10, b"\x00\x02\x00\x1d") + sigalgs + key_share
    body = (b"\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32) + b"\x00\x02\x13\x01" + b"\x01\x00"
            + struct.pack("!H", len(exts)) + exts)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def hello(a) -> dict:
    try:
        s = _conn(a.host, a.port, 10)
        s.sendall(client_hello(bytes.fromhex(a.data)))
    except OSError as e:
        return _fail(e)
    got, end = _read(s, a.wait)
    alert = got[:2] == b"\x15\x03" and len(got) >= 7
    return {"ok": alert, "received": got[:64].hex(), "end": end,
            "alert": got[6] if alert else None}


def hoard(a) -> dict:
    socks: list[socket.socket] = []
    outcome: dict[str, int] = {}
    for _ in range(a.count):
        try:
            socks.append(_conn(a.host, a.port, 10))
        except OSError as e:
            key = "connect:" + errno.errorcode.get(e.errno or 0, "?")
            outcome[key] = outcome.get(key, 0) + 1
    head = b"GET /trickle HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 4096
    chunk = os.urandom(64 << 10)
    want = a.push << 10
    sent = [0] * len(socks)
    for s in socks:
        s.setblocking(False)
    print(json.dumps({"phase": "connected", "connected": len(socks), "pid": os.getpid()}), flush=True)
    deadline = time.monotonic() + a.hold
    alive = set(range(len(socks)))
    i = 0
    while time.monotonic() < deadline and alive:
        for k in list(alive):
            s = socks[k]
            try:
                if not s.recv(65536):
                    alive.discard(k)
                    outcome["eof"] = outcome.get("eof", 0) + 1
                    continue
            except BlockingIOError:
                pass
            except OSError as e:
                alive.discard(k)
                key = errno.errorcode.get(e.errno or 0, "?")
                outcome[key] = outcome.get(key, 0) + 1
                continue
            try:
                while sent[k] < want:  # push until the proxy stops reading (or all is sent)
                    sent[k] += s.send(chunk[:min(len(chunk), want - sent[k])])
                if a.trickle and i < len(head):
                    s.send(head[i:i + 1])
            except (BlockingIOError, OSError):
                pass
        i += 1
        time.sleep(a.trickle or 0.1)
    outcome["open"] = len(alive)
    return {"ok": True, "connected": len(socks), "pushed": sum(sent), "outcome": outcome}


def connect(a) -> dict:
    fam = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(10)
    t0 = time.monotonic()
    out: dict = {}
    try:
        s.connect((a.host, a.port))
        out["connect"] = "ok"
        if a.send:
            s.sendall(b"hello\n")
        data = s.recv(100)
        out["read"] = "eof" if not data else "data"
    except OSError as e:
        out["connect" if "connect" not in out else "read"] = errno.errorcode.get(e.errno or 0, str(e))
    out["seconds"] = round(time.monotonic() - t0, 6)
    out["ok"] = True
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["send", "pg", "tls", "hello", "hoard", "connect"])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("data", nargs="?", default="")
    ap.add_argument("path", nargs="?", default="/")
    ap.add_argument("--dribble", type=int, default=1)
    ap.add_argument("--pause", type=float, default=1.0)
    ap.add_argument("--wait", type=float, default=10.0)
    ap.add_argument("--push", type=int, default=0)
    ap.add_argument("--trickle", type=float, default=0.0)
    ap.add_argument("--hold", type=float, default=5.0)
    ap.add_argument("--send", action="store_true")
    a = ap.parse_args()
    if a.mode == "tls":
        a.sni = a.data
    elif a.mode == "hoard":
        a.count = int(a.data)
    result = globals()[a.mode](a)
    result["pid"] = os.getpid()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
