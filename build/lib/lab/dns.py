"""A tiny authoritative DNS responder for lab names, run on the server host.

`python -m lab.dns PORT NAME=ADDR[,ADDR…] …` answers A and AAAA for the names given (NXDOMAIN for
the rest). An instance whose `dns_upstream` points here lets agents resolve test hostnames the
way they resolve any name (the resolver hook sends their queries to the proxy, the proxy here),
with no /etc/hosts edit on the machine and no --resolve flag on the client."""

from __future__ import annotations

import ipaddress
import socket
import sys

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
    port, zone = int(argv[0]), parse_zone(argv[1:])
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(4096)
        out = answer(data, zone)
        if out is not None:
            sock.sendto(out, peer)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
