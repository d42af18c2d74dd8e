"""libnftables is not thread-safe: two threads of one process listing a table at once can get it
back altered (`meta l4proto { tcp, tcp }` for `{ tcp, udp }`: protocol names go through
getprotobynumber()'s static buffer). The daemon lists its table from its watch thread and from
its status thread, and an altered listing is tampering to it: a kernel-matrix run locked every
agent out while a test polled `status`. interceptor.firewall runs one libnftables command at a
time per process.

The test runs in the lab's agent namespace: four threads list a Backstop table through
firewall.snapshot and every listing equals the installed one. The control: the same four threads
calling libnftables directly get an altered listing, or crash the process (SIGSEGV, seen too),
within a tenth of a second when measured; the test allows 20 s. Each runs in its own process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.datapath

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, threading, time
from pathlib import Path
import nftables
from interceptor import firewall

table, mode = sys.argv[1], sys.argv[2]
backstop = firewall.Backstop(table, Path("/nonexistent/agents"), 2, 0x494C0001, 15001, 15053, 15003)
expected = firewall.install(backstop)


def race(list_once, limit, seconds):
    # four threads list until one listing differs, `limit` listings are done, or time is up
    stop, counts, altered = threading.Event(), [0], []
    def run():
        while not stop.is_set():
            got = list_once()
            counts[0] += 1
            if got != expected:
                altered.append(firewall.differences(expected, got))
            if altered or counts[0] >= limit:
                stop.set()
    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    return counts[0], altered


def raw():
    n = nftables.Nftables()
    n.set_json_output(True)
    _, out, _ = n.cmd(f"list table inet {table}")
    return [firewall._normalise(i) for i in json.loads(out).get("nftables", []) if "metainfo" not in i]


try:
    if mode == "raw":
        result = race(raw, 10**9, 20)
    else:
        result = race(lambda: firewall.snapshot(table), 4000, 60)
finally:
    firewall.remove(table)
print(json.dumps(result))
"""


def _race(lab, script: Path, mode: str):
    return lab.a.run([sys.executable, str(script), f"interlock-threads-{mode}", mode], cwd=REPO, timeout=120,
                     env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def test_listings_from_several_threads_are_never_altered(lab, tmp_path):
    script = tmp_path / "race.py"
    script.write_text(SCRIPT)
    control = _race(lab, script, "raw")
    if control.returncode == 0:
        n, altered = json.loads(control.stdout.strip().splitlines()[-1])
        assert altered, f"control: {n} unserialised listings, none altered (is libnftables thread-safe now?)"
    else:  # the unserialised calls crashed the process: the race is there
        assert control.returncode < 0, control.stderr[-3000:]
    r = _race(lab, script, "firewall")
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    n, altered = json.loads(r.stdout.strip().splitlines()[-1])
    assert n >= 4000 and not altered, (n, altered)
