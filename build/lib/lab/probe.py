"""What an agent does in the tests: connect, send, read the echo, and report as one JSON line.

`python -m lab.probe tcp HOST PORT [--thread] [--fork] [--v4mapped]`, `udp HOST PORT [--dns NAME]`
or `raw` (open a raw socket).
Exit 0 when the echo came back, 1 when the attempt failed (the JSON says how)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading

from lab.testing import SLOWDOWN


def tcp(host: str, port: int, v4mapped: bool) -> dict:
    if v4mapped:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        target = (f"::ffff:{host}", port)
    else:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        target = (host, port)
    s.settimeout(5 * SLOWDOWN)  # a held connection may wait for a human's CLI call
    try:
        s.connect(target)
        peer = s.getpeername()
        s.sendall(b"hello interlock\n")
        data = s.recv(100)
        return {"ok": data == b"hello interlock\n", "peer": [peer[0], peer[1]], "echo": data.decode(errors="replace")}
    except OSError as e:
        return {"ok": False, "error": e.__class__.__name__, "errno": e.errno, "message": str(e)}
    finally:
        s.close()


def bulk(host: str, port: int, megabytes: int) -> dict:
    """Send `megabytes` of random data to an echo server while reading the echo back; compare."""
    import hashlib

    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(30)
    payload = os.urandom(megabytes << 20)
    got = hashlib.sha256()
    received = 0

    def reader() -> None:
        nonlocal received
        while received < len(payload):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got.update(chunk)
            received += len(chunk)

    try:
        s.connect((host, port))
        t = threading.Thread(target=reader)
        t.start()
        s.sendall(payload)
        t.join(60)
        s.shutdown(socket.SHUT_WR)
        ok = received == len(payload) and got.digest() == hashlib.sha256(payload).digest()
        return {"ok": ok, "sent": len(payload), "received": received}
    except OSError as e:
        return {"ok": False, "error": e.__class__.__name__, "errno": e.errno, "message": str(e)}
    finally:
        s.close()


def dns_query(name: str) -> bytes:
    import dpkt

    q = dpkt.dns.DNS(id=0x1234, qd=[dpkt.dns.DNS.Q(name=name, type=dpkt.dns.DNS_A)])
    return bytes(q)


def udp(host: str, port: int, payload: bytes = b"datagram") -> dict:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(3 * SLOWDOWN)
    try:
        s.sendto(payload, (host, port))
        data, addr = s.recvfrom(100)
        return {"ok": True, "from": [addr[0], addr[1]]}
    except OSError as e:
        return {"ok": False, "error": e.__class__.__name__, "errno": e.errno, "message": str(e)}
    finally:
        s.close()


def raw() -> dict:
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except OSError as e:
        return {"ok": False, "error": e.__class__.__name__, "errno": e.errno, "message": str(e)}
    s.close()
    return {"ok": True}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["tcp", "udp", "raw"])
    ap.add_argument("host", nargs="?", default="")
    ap.add_argument("port", type=int, nargs="?", default=0)
    ap.add_argument("--dns", metavar="NAME", help="udp: send a DNS query for NAME")
    ap.add_argument("--bulk", type=int, metavar="MB", help="tcp: stream MB through an echo server and verify it")
    ap.add_argument("--thread", action="store_true", help="connect from a worker thread")
    ap.add_argument("--fork", action="store_true", help="connect from a forked child")
    ap.add_argument("--v4mapped", action="store_true", help="IPv6 socket to a v4-mapped address")
    a = ap.parse_args()

    def attempt() -> dict:
        if a.kind == "raw":
            return raw()
        if a.kind == "udp":
            return udp(a.host, a.port, dns_query(a.dns) if a.dns else b"datagram")
        if a.bulk:
            return bulk(a.host, a.port, a.bulk)
        return tcp(a.host, a.port, a.v4mapped)

    if a.thread:
        box: dict = {}
        t = threading.Thread(target=lambda: box.update(attempt()))
        t.start()
        t.join()
        result = box
    elif a.fork:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, json.dumps(attempt()).encode())
            os._exit(0)
        os.close(w)
        result = json.loads(os.read(r, 65536) or b"{}")
        os.waitpid(pid, 0)
    else:
        result = attempt()
    result["pid"] = os.getpid()
    print(json.dumps(result))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
