"""Hole 12, tamper checks by string: root changes the instance's nft table without removing it
(an `accept` rule at the top of the agent chain, a new base chain, a new set, the table made
dormant). The daemon compares the installed table as a whole with what it generated: each change
puts it in lockdown within the watch interval (agent traffic refused, nothing reaches the
server), a tamper event names the difference, the table is put back; `rearm` restores service
(the control)."""

from __future__ import annotations

import errno

import pytest

from lab.instance import Instance
from lab.testing import ECHO_PORT, instance_name, wait_until

pytestmark = pytest.mark.datapath

TAMPERINGS = {
    "accept-rule": "insert rule inet {t} agent accept",
    "new-chain": "add chain inet {t} sneaky {{ type filter hook output priority -300; policy accept; }}; "
                 "add rule inet {t} sneaky meta mark set 0",
    "new-set": "add set inet {t} allowed {{ type ipv4_addr; }}; add element inet {t} allowed {{ 10.0.0.1 }}",
    "dormant": "add table inet {t} {{ flags dormant; }}",
    "counter-rule": "add rule inet {t} output counter",
}


@pytest.fixture(scope="module")
def inst(lab):
    i = Instance(lab.a, instance_name("tp"), proxy_port=15721, dns_port=15722)
    i.start()
    yield i
    i.close()


@pytest.mark.parametrize("how", TAMPERINGS)
def test_any_change_to_the_table_locks_down_until_rearmed(inst, lab, echo, how):
    table = "interlock-" + inst.name
    assert inst.probe("tcp", lab.b.addr4, str(ECHO_PORT))["ok"], "control: the agent is served before"
    tampers = len(inst.events("tamper"))
    r = lab.a.run(["nft", TAMPERINGS[how].format(t=table)])
    assert r.returncode == 0, r.stderr
    assert wait_until(lambda: inst.status()["lockdown"]), f"{how}: the daemon did not notice"
    before = len(echo.seen("tcp"))
    p = inst.probe("tcp", lab.b.addr4, str(ECHO_PORT))
    assert not p["ok"] and p["errno"] == errno.EPERM, p
    wait_until(lambda: False, timeout=0.3)
    assert len(echo.seen("tcp")) == before, "the server saw agent traffic during lockdown"
    ev = inst.events("tamper")[tampers:]
    assert ev and ev[0]["data"]["what"] == "nft" and ev[0]["data"]["differences"], ev
    st = inst.status()
    assert st["nft_intact"], "the generated table was put back"
    assert "sneaky" not in lab.a.run(["nft", "list", "table", "inet", table]).stdout
    assert inst.cli("rearm").returncode == 0
    assert inst.probe("tcp", lab.b.addr4, str(ECHO_PORT))["ok"], "rearm restores service"
    assert not inst.status()["lockdown"]


def test_counters_moving_is_not_tampering(inst, lab, echo):
    """The reject rules' counters change with traffic; only the table's content is compared."""
    assert inst.probe("udp", lab.b.addr4, str(ECHO_PORT))["errno"] == errno.EPERM
    table = "interlock-" + inst.name
    listed = lab.a.run(["nft", "list", "table", "inet", table]).stdout
    assert "counter packets" in listed
    wait_until(lambda: False, timeout=1.0)
    assert not inst.status()["lockdown"]
