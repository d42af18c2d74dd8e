"""Issue 10, connect to a closed port: direct, the agent's connect() fails with ECONNREFUSED at
once; through Interlock the proxy has already accepted (the kernel completes the handshake before
the proxy can know the service is down), so the nearest it can give is a reset as soon as its own
connect is refused: the agent's next read or write fails with ECONNRESET, never a clean EOF that
looks like a server that answered and hung up. Measured both ways (printed with -s)."""

from __future__ import annotations

import json
import sys

import pytest

from lab.instance import Instance
from lab.testing import ECHO_PORT, instance_name, wait_until

pytestmark = pytest.mark.datapath

AS_AGENT = ["setpriv", "--reuid", "65533", "--regid", "65533", "--clear-groups"]
CLOSED = 7999


@pytest.fixture(scope="module")
def inst(lab):
    i = Instance(lab.a, instance_name("cp"), proxy_port=16701, dns_port=16753)  # the embedded default policy
    try:
        i.start()
        yield i
    finally:
        i.close()


def attempt(inst: Instance, port: int, *extra: str, captured: bool = True) -> dict:
    cmd = [*AS_AGENT, sys.executable, "-m", "lab.slow", "connect", inst.host_addr, str(port), *extra]
    r = inst.agent(cmd) if captured else inst.host.run(cmd)
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("send", [False, True], ids=["read-first", "write-first"])
def test_closed_port_gives_a_reset_not_an_eof(inst, lab, echo, send):
    inst.host_addr = lab.b.addr4
    extra = ("--send",) if send else ()
    assert not lab.b.run(["ss", "-Hltn", f"sport = :{CLOSED}"]).stdout.strip(), "something listens on the closed port"
    direct = attempt(inst, CLOSED, *extra, captured=False)
    assert direct["connect"] == "ECONNREFUSED", direct
    through = attempt(inst, CLOSED, *extra)
    print(f"closed port, {'write' if send else 'read'} first: direct {direct} / through Interlock {through}")
    # the reset may even beat the agent's connect() back to user space: then connect() itself fails
    assert through["connect"] == "ECONNRESET" or (through["connect"], through["read"]) == ("ok", "ECONNRESET"), through
    s = wait_until(lambda: next((x for x in inst.sessions() if x["tgid"] == through["pid"] and x["ended"]), None))
    assert s["outcome"] == "upstream-error" and "refused" in s["detail"].lower(), s
    # control: an open port through the same path answers
    ok = attempt(inst, ECHO_PORT, "--send")
    assert (ok["connect"], ok["read"]) == ("ok", "data"), ok
