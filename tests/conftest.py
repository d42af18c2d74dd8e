"""Fixtures that start real parts: lab namespaces, servers, and Interlock daemons.

Datapath tests never skip: on a host without the kernel hooks they fail, with the doctor's
verdict as the reason."""

from __future__ import annotations

import pytest

from lab.instance import Instance
from lab.netns import Lab
from lab.testing import ECHO_PORT, EchoServer, instance_name


def pytest_configure(config):
    config.addinivalue_line("markers", "datapath: needs root, cgroup BPF hooks and nftables (never skipped)")


@pytest.fixture(scope="session", autouse=True)
def _host_ready(request):
    if not any(item.get_closest_marker("datapath") for item in request.session.items):
        return
    from interceptor import doctor

    bad = [c for c in doctor.run_checks(quick=True) if not c.ok and c.fatal]
    if bad:
        pytest.fail("host cannot run the datapath: " + "; ".join(f"{c.name}: {c.detail} (fix: {c.fix})" for c in bad))


@pytest.fixture(scope="module")
def lab():
    with Lab() as lab_:
        yield lab_


@pytest.fixture(scope="module")
def echo_at(lab, tmp_path_factory):
    """Start an EchoServer on a port of the server host (its log of what arrived is the
    server-side evidence); every one is stopped with the module."""
    started: list[EchoServer] = []

    def start(port: int) -> EchoServer:
        srv = EchoServer(lab.b, port, tmp_path_factory.mktemp(f"echo{port}") / "seen.jsonl")
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def echo(echo_at):
    return echo_at(ECHO_PORT)


@pytest.fixture(scope="module")
def dns_echo(echo_at):
    """A UDP responder on port 53 of the server host: it answers a query with the query."""
    return echo_at(53)


@pytest.fixture
def make_instance(lab):
    """Start instances on the agent host; all are torn down after the test, also on failure."""
    started: list[Instance] = []

    def make(tag: str = "x", scoped: bool = False, **config) -> Instance:
        """scoped: hooks on the whole lab host's cgroup (as "/" on a real host), for selectors."""
        name = instance_name(tag)
        if scoped:
            scope = str(lab.cgroup.relative_to(lab.cgroup.parent))
            config = {"cgroup_root": f"{scope}/interlock-{name}", "capture_cgroup": scope, **config}
        inst = Instance(lab.a, name, **config)
        started.append(inst)
        return inst.start()

    yield make
    for inst in started:
        inst.close()
