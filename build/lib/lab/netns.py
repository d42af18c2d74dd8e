"""Two hosts on a wire: an agent host and a server host, each a network namespace.

Processes enter a namespace with `nsenter --net` rather than `ip netns exec`, which remounts
/sys and would hide the cgroup2 and bpffs mounts the daemon needs."""

from __future__ import annotations

import itertools
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns

from interceptor.cgroups import cgroup2_mount, remove_tree

IFA_F_NODAD = 0x02
_counter = itertools.count()


@dataclass
class Host:
    """A namespace whose processes also start in a cgroup of the lab's own (`cgroup`), as a
    real host's processes live below its root cgroup: a wide capture scope sees them."""

    name: str
    addr4: str
    addr6: str
    cgroup: Path | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def argv(self, cmd: list[str]) -> list[str]:
        enter = ["nsenter", f"--net={self.path}", "--", *cmd]
        if self.cgroup is None:
            return enter
        return ["sh", "-c", f'echo $$ > {self.cgroup}/cgroup.procs && exec "$@"', "sh", *enter]

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(self.argv(cmd), **kw)

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(self.argv(cmd), **kw)
        self.procs.append(p)
        return p


class Lab:
    """An agent host `a` and a server host `b` joined by a veth pair; removed on exit."""

    def __init__(self, tag: str = "il"):
        n = next(_counter)
        base = f"{tag}{os.getpid() % 100000}x{n}"
        sub = 1 + (os.getpid() + n) % 250
        self.cgroup = cgroup2_mount() / f"interlock-lab-{base}"
        self.a = Host(f"{base}a", f"10.231.{sub}.1", f"fd00:231:{sub:x}::1", self.cgroup)
        self.b = Host(f"{base}b", f"10.231.{sub}.2", f"fd00:231:{sub:x}::2")

    def __enter__(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        self.cgroup.mkdir()
        for h in (self.a, self.b):
            netns.create(h.name)
        veth_a, veth_b = f"v{self.a.name}"[:15], f"v{self.b.name}"[:15]
        with IPRoute() as ipr:
            ipr.link("add", ifname=veth_a, kind="veth", peer={"ifname": veth_b, "net_ns_fd": self.b.name})
            idx = ipr.link_lookup(ifname=veth_a)[0]
            ipr.link("set", index=idx, net_ns_fd=self.a.name)
        for h, ifname in ((self.a, veth_a), (self.b, veth_b)):
            with NetNS(h.name) as ns:
                lo = ns.link_lookup(ifname="lo")[0]
                ns.link("set", index=lo, state="up")
                idx = ns.link_lookup(ifname=ifname)[0]
                ns.addr("add", index=idx, address=h.addr4, prefixlen=24)
                ns.addr("add", index=idx, address=h.addr6, prefixlen=64, flags=IFA_F_NODAD)
                ns.link("set", index=idx, state="up")

    def close(self) -> None:
        for h in (self.a, self.b):
            for p in h.procs:
                if p.poll() is None:
                    p.kill()
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
            if h.name in netns.listnetns():
                netns.remove(h.name)
        remove_tree(self.cgroup, cgroup2_mount())

    def __exit__(self, *exc) -> None:
        self.close()
