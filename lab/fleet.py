"""Several agent hosts reporting to one recorder host: a second Lab's agent host wired to the first
Lab's server host (where lab/central.py runs the recorder and the echo servers listen).

    with Lab() as lab, Lab("s2") as lab2:
        wire(lab2.a, lab.b)   # lab2.a now reaches lab.b.addr4 (the recorder's URL, the echo server)

The extra veth pair lives in the two namespaces and goes with them."""

from __future__ import annotations

import itertools
import os

from pyroute2 import NetNS

from lab.netns import Host

_nets = itertools.count()


def wire(x: Host, y: Host) -> tuple[str, str]:
    """A veth pair between hosts x and y on a /24 of their own, and a route in x to y's main IPv4
    address through it. Returns (x's, y's) address on the new link."""
    n = next(_nets)
    sub = 1 + (os.getpid() + 7 * n) % 250
    ax, ay = f"10.232.{sub}.1", f"10.232.{sub}.2"
    vx, vy = f"w{x.name}"[:15], f"w{y.name}"[:15]
    with NetNS(x.name) as ns:
        ns.link("add", ifname=vx, kind="veth", peer={"ifname": vy, "net_ns_fd": y.name})
    for host, ifname, addr in ((x, vx, ax), (y, vy, ay)):
        with NetNS(host.name) as ns:
            idx = ns.link_lookup(ifname=ifname)[0]
            ns.addr("add", index=idx, address=addr, prefixlen=24)
            ns.link("set", index=idx, state="up")
    with NetNS(x.name) as ns:
        ns.route("add", dst=f"{y.addr4}/32", gateway=ay)
    return ax, ay
