"""A TCP peer built from raw packets (scapy), for what a kernel client never sends: a handshake
whose segments arrive as IPv4 or IPv6 fragments (the TCP header split between them; IPv6 keeps
the 20-byte base header in the first fragment, as Linux drops first fragments without it,
RFC 7112), or behind IPv6 extension headers.

`python -m lab.rawpeer HOST PORT [--fragment BYTES] [--ext-headers]` does SYN, waits for the
SYN-ACK, ACKs it, then listens for two seconds (scaled by SLOWDOWN) and prints one JSON line:
{"synack": bool, "got": text the other side sent, "rst": bool, "sport": our port}. The kernel of
the host it runs on does not know this connection and would reset it: the caller drops this
host's outgoing resets to PORT first (`block_kernel_resets`)."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from lab.testing import SLOWDOWN


def block_kernel_resets(host, port: int) -> str:
    """An nft table in `host`'s namespace that drops its kernel's resets to `port`; returns its
    name (remove it with `host.run(["nft", "delete", "table", "inet", name])`)."""
    name = f"rawpeer{port}"
    rules = (f"table inet {name} {{\n chain out {{\n type filter hook output priority filter; policy accept;\n"
             f" tcp dport {port} tcp flags & rst == rst drop\n }}\n}}\n")
    r = host.run(["nft", "-f", "-"], input=rules)
    if r.returncode != 0:
        raise RuntimeError(f"cannot add {name}: {r.stderr}")
    return name


def handshake(host: str, port: int, fragment: int, ext_headers: bool) -> dict:
    from scapy.all import IP, TCP, AsyncSniffer, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, conf, fragment6, send
    from scapy.all import fragment as fragment4

    six = ":" in host
    sport, seq = random.randint(40000, 60000), random.randint(0, 2**31)
    if six:
        ip = IPv6(dst=host)
        if ext_headers:
            ip = ip / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
        iface = conf.route6.route(host)[0]
    else:
        ip = IP(dst=host)
        iface = conf.route.route(host)[0]

    def wire(pkt):
        if not fragment:
            return [pkt]
        if six:
            unfragmentable = len(pkt) - len(pkt[TCP]) + 8  # IPv6 and extension headers, Fragment header
            return fragment6(_with_frag_header(pkt, IPv6ExtHdrFragment), unfragmentable + fragment)
        return fragment4(pkt, fragsize=fragment)

    def ours(p) -> bool:  # a Python filter: no libpcap needed
        return TCP in p and p[TCP].sport == port and p[TCP].dport == sport

    seen: list = []  # filled as packets arrive (AsyncSniffer.results only exists after stop())
    sniffer = AsyncSniffer(iface=iface, lfilter=ours, prn=seen.append, store=False)
    sniffer.start()
    time.sleep(0.5)
    send(wire(ip / TCP(sport=sport, dport=port, flags="S", seq=seq, window=65535,
                       options=[("MSS", 1400), ("SAckOK", b""), ("Timestamp", (1, 0)), ("WScale", 7)])), verbose=False)
    deadline = time.monotonic() + 5 * SLOWDOWN
    synack = None
    while synack is None and time.monotonic() < deadline:
        time.sleep(0.1)
        synack = next((p for p in seen if p[TCP].flags & 0x12 == 0x12), None)
    got, rst = b"", False
    if synack is not None:
        send(wire(ip / TCP(sport=sport, dport=port, flags="A", seq=seq + 1, ack=synack[TCP].seq + 1,
                           window=65535)), verbose=False)
        time.sleep(2 * SLOWDOWN)
    sniffer.stop()
    for p in seen:
        t = p[TCP]
        rst = rst or bool(t.flags & 0x04)
        if p is not synack:
            got += bytes(t.payload)
    return {"synack": synack is not None, "got": got.decode(errors="replace"), "rst": rst, "sport": sport}


def _with_frag_header(pkt, frag_cls):
    """Insert a Fragment extension header right before TCP (fragment6 needs one to split at)."""
    from scapy.all import TCP

    tcp = pkt[TCP]
    head = pkt.copy()
    head[TCP].underlayer.remove_payload()
    return head / frag_cls() / tcp


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--fragment", type=int, default=0, help="send each segment as fragments of this many bytes")
    ap.add_argument("--ext-headers", action="store_true", help="IPv6: hop-by-hop and destination options headers")
    a = ap.parse_args()
    print(json.dumps(handshake(a.host, a.port, a.fragment, a.ext_headers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
