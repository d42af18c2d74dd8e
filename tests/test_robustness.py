"""Hostile agents against the real proxy: it stays up, keeps serving and records every attempt."""

from __future__ import annotations

import sys

import pytest

from lab.instance import Instance
from lab.testing import ECHO_PORT, instance_name, wait_until

pytestmark = pytest.mark.datapath


@pytest.fixture(scope="module")
def inst(lab):
    i = Instance(lab.a, instance_name("h"), proxy_port=15901, dns_port=15953)
    i.start()
    yield i
    i.close()


def test_garbage_resets_floods_and_silence_do_not_take_the_proxy_down(inst, lab, echo, dns_echo):
    proxy_pids = inst.status()["proxy_pids"]  # every worker
    pids = []
    for port in (ECHO_PORT, 53):  # an echoing server, and a port where nothing listens on TCP
        r = inst.agent([sys.executable, "-m", "lab.hostile", lab.b.addr4, str(port)], timeout=120)
        assert r.returncode == 0, r.stderr
        opened, pid = map(int, r.stdout.split())
        assert opened == 40
        pids.append(pid)
    st = inst.status()
    assert st["proxy_pids"] == proxy_pids and st["proxy_listening"], "a proxy worker restarted or died"
    assert inst.probe("tcp", lab.b.addr4, str(ECHO_PORT))["ok"]

    def ended():
        return [s for s in inst.sessions() if s["tgid"] in pids and s["ended"]]

    # connections reset before the proxy accepted them are swept from the kernel's records
    rows = wait_until(lambda: len(ended()) == 80 and ended(), timeout=30)
    assert rows, f"every hostile connection has an ended session row ({len(ended())} of 80)"
    assert all(s["exe"].startswith("/usr/bin/python3") for s in rows), "swept rows still name the program"
    assert "Traceback" not in inst.log.read_text()
