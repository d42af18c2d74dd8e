"""Running Interlock as an operator would: where the cgroup2 hierarchy is not visible."""

from __future__ import annotations

import json
import sys

import pytest

from interceptor.cgroups import cgroup2_mount
from lab.instance import INTERLOCK
from lab.testing import ECHO_PORT

pytestmark = pytest.mark.datapath


def test_the_cli_works_where_the_cgroup2_mount_is_hidden(make_instance, lab, echo):
    """As under `ip netns exec` (which remounts /sys): a private mount namespace without the
    cgroup2 mount. The CLI mounts the hierarchy itself and enrols, runs and reports as usual."""
    inst = make_instance("h", proxy_port=15611, dns_port=15612)
    hide = f"umount -l {cgroup2_mount()} && "
    probe = [*INTERLOCK, "run", "--state-dir", str(inst.state_dir), "--agent", "bot", "--",
             sys.executable, "-m", "lab.probe", "tcp", lab.b.addr4, str(ECHO_PORT)]
    r = lab.a.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   hide + "grep -c cgroup2 /proc/mounts; exec \"$@\"", "sh", *probe])
    assert r.stdout.splitlines()[0] == "0", "sanity: the mount namespace shows no cgroup2"
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["ok"], r.stderr
    # and the connection went through the proxy, recorded under the agent's name
    assert any(s["tgid"] == result["pid"] and s["agent"] == "bot" for s in inst.sessions())
    st = lab.a.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    hide + 'exec "$@"', "sh", *INTERLOCK, "status", "--state-dir", str(inst.state_dir), "--json"])
    assert json.loads(st.stdout)["instance"] == inst.name, st.stderr
