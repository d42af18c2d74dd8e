"""A tiny authoritative DNS responder for lab names, run on the server host.

`python -m lab.dns PORT [--log=FILE] [--silent=NAME…] NAME=ADDR[,ADDR…] …` answers A and AAAA for
the names given (NXDOMAIN for the rest). --log writes one JSON line per datagram received (its
bytes in hex, the names asked): what reached the server, for tests that check nothing did.
--silent names a name it never answers: an upstream that does not respond.

An instance whose `dns_upstream` points here lets agents resolve test hostnames the way they
resolve any name (the resolver hook sends their queries to the proxy, the proxy here),
with no /etc/hosts edit on the machine and no --resolve flag on the client."""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import threading

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


def parse_zone(args: list[str]) -> dict[str, list[str]]:
    zone: dict[str, list[str]] = {}
    for arg in args:
        name, _, addrs = arg.partition("=")
        zone[name.lower().rstrip(".") + "."] = [a for a in addrs.split(",") if a]
    return zone


def answer(query: bytes, zone: dict[str, list[str]]) -> bytes | None:
    try:
        q = dns.message.from_wire(query)
    except Exception:  # noqa: BLE001 (anything malformed is dropped, as a real server would)
        return None
    r = dns.message.make_response(q)
    for question in q.question:
        name = question.name.to_text().lower()
        if name not in zone:
            r.set_rcode(dns.rcode.NXDOMAIN)
            continue
        version = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
        addrs = [a for a in zone[name] if ipaddress.ip_address(a).version == version]
        if addrs:
            r.answer.append(dns.rrset.from_text(question.name, 5, "IN", dns.rdatatype.to_text(question.rdtype), *addrs))
    return r.to_wire()


def main(argv: list[str]) -> int:
    port = int(argv[0])
    opts = [a for a in argv[1:] if a.startswith("--")]
    zone = parse_zone([a for a in argv[1:] if not a.startswith("--")])
    log = next((a.split("=", 1)[1] for a in opts if a.startswith("--log=")), None)
    silent = {a.split("=", 1)[1].lower().rstrip(".") + "." for a in opts if a.startswith("--silent=")}
    lock = threading.Lock()

    def handle(data: bytes, peer: str, transport: str) -> bytes | None:
        names = _names(data)
        if log:
            with lock, open(log, "a") as f:
                f.write(json.dumps({"peer": peer, "hex": data.hex(), "names": names, "transport": transport}) + "\n")
        if names and all(n in silent for n in names):
            return None
        return answer(data, zone)

    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("::", port))
    tcp.listen(64)
    threading.Thread(target=_serve_tcp, args=(tcp, handle), daemon=True).start()
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(4096)
        out = handle(data, peer[0], "udp")
        if out is not None:
            sock.sendto(out, peer)


def _serve_tcp(listener: socket.socket, handle) -> None:
    """DNS over TCP (RFC 1035 §4.2.2): two-byte length, message; one thread per connection."""
    def conn(c: socket.socket, peer: str) -> None:
        with c:
            buf = b""
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                    n = int.from_bytes(buf[:2], "big")
                    out = handle(buf[2:2 + n], peer, "tcp")
                    buf = buf[2 + n:]
                    if out is not None:
                        c.sendall(len(out).to_bytes(2, "big") + out)

    while True:
        c, peer = listener.accept()
        threading.Thread(target=conn, args=(c, peer[0]), daemon=True).start()


def _names(data: bytes) -> list[str]:
    try:
        return [q.name.to_text().lower() for q in dns.message.from_wire(data).question]
    except Exception:  # noqa: BLE001
        return []


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
