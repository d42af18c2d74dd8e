"""A small stand-in for the datapath suite (--suite smoke): the kernel loads every program and
nf_tables takes the backstop's rule types. Touches only a netns of its own."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from interceptor.bpf_loader import HOOKS, Datapath

RULES = """table inet interlock-smoke {
 chain o {
  type filter hook output priority 0;
  meta mark 0x1 ct direction reply accept
  meta l4proto tcp reject with tcp reset
  reject with icmpx admin-prohibited
 }
}
"""


def test_programs_compile_and_load():
    with tempfile.TemporaryDirectory(prefix="interlock-smoke-") as tmp:
        dp = Datapath(Path(tmp) / "pins", Path(tmp), pin=False)
        dp.compile()
        assert sorted(dp.funcs) == sorted(h.func for h in HOOKS)


def test_backstop_rules_load_in_a_fresh_netns():
    r = subprocess.run(["unshare", "--net", "--", "sh", "-c", "nft -f - && nft list ruleset"],
                       input=RULES, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "interlock-smoke" in r.stdout
