"""What an agent does in the tests: connect, send, read the echo, and report as one JSON line.

`python -m lab.probe tcp HOST PORT [--thread] [--fork] [--v4mapped]`, `udp HOST PORT [--dns NAME]`
or `raw` (open a raw socket). Inbound: `listen PORT [--family 4|6|dual] [--udp] [--count N]` serves
as the agent (prints `{"listening": PORT}` once bound, then sends BANNER to each peer and echoes a
line back), `dial HOST PORT [--udp]` is the peer on another host (reports every byte it got).
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


BANNER = b"agent says: here is my data\n"
PEER_LINE = b"hello from the peer\n"


def listen(port: int, family: str, udp: bool, count: int, wait: float) -> dict:
    """Be the agent's server: report each connection (or datagram) that reached it."""
    fam = socket.AF_INET if family == "4" else socket.AF_INET6
    s = socket.socket(fam, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if family == "6" else 0)
    s.bind(("0.0.0.0" if fam == socket.AF_INET else "::", port))
    if not udp:
        s.listen(16)
    print(json.dumps({"listening": port}), flush=True)
    s.settimeout(wait * SLOWDOWN)
    got: list[dict] = []
    try:
        while len(got) < count:
            if udp:
                data, addr = s.recvfrom(2048)
                got.append({"peer": addr[0], "bytes": len(data)})
                continue
            c, addr = s.accept()
            with c:
                c.settimeout(5 * SLOWDOWN)
                entry = {"peer": addr[0]}
                try:
                    c.sendall(BANNER)
                    line = c.recv(100)
                    c.sendall(line)
                    entry["got"] = line.decode(errors="replace")
                except OSError as e:
                    entry["error"] = str(e)
                got.append(entry)
    except TimeoutError:
        pass
    finally:
        s.close()
    return {"ok": bool(got), "accepted": got}


def dial(host: str, port: int, udp: bool) -> dict:
    """Be the peer on another host: connect, read what the agent sends, send a line, read the echo."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    s.settimeout(5 * SLOWDOWN)  # an inbound connection may be held for a human
    received = b""
    try:
        if udp:
            for _ in range(3):
                s.sendto(PEER_LINE, (host, port))
            return {"ok": True, "sent": 3}
        s.connect((host, port))
        while BANNER not in received:
            chunk = s.recv(100)
            if not chunk:
                break
            received += chunk
        s.sendall(PEER_LINE)
        while not received.endswith(PEER_LINE):
            chunk = s.recv(100)
            if not chunk:
                break
            received += chunk
        return {"ok": received == BANNER + PEER_LINE, "got": received.decode(errors="replace")}
    except OSError as e:
        return {"ok": False, "error": e.__class__.__name__, "errno": e.errno, "message": str(e),
                "got": received.decode(errors="replace")}
    finally:
        s.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["tcp", "udp", "raw", "listen", "dial"])
    ap.add_argument("host", nargs="?", default="")
    ap.add_argument("port", type=int, nargs="?", default=0)
    ap.add_argument("--dns", metavar="NAME", help="udp: send a DNS query for NAME")
    ap.add_argument("--bulk", type=int, metavar="MB", help="tcp: stream MB through an echo server and verify it")
    ap.add_argument("--thread", action="store_true", help="connect from a worker thread")
    ap.add_argument("--fork", action="store_true", help="connect from a forked child")
    ap.add_argument("--v4mapped", action="store_true", help="IPv6 socket to a v4-mapped address")
    ap.add_argument("--family", choices=["4", "6", "dual"], default="4", help="listen: socket family")
    ap.add_argument("--udp", action="store_true", help="listen/dial: UDP instead of TCP")
    ap.add_argument("--count", type=int, default=1, help="listen: stop after this many connections")
    ap.add_argument("--wait", type=float, default=10.0, help="listen: give up after this long without one")
    a = ap.parse_args()
    if a.kind == "listen":
        a.port = int(a.host)

    def attempt() -> dict:
        if a.kind == "raw":
            return raw()
        if a.kind == "listen":
            return listen(a.port, a.family, a.udp, a.count, a.wait)
        if a.kind == "dial":
            return dial(a.host, a.port, a.udp)
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
