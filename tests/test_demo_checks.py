"""`make demo` exits non-zero when any step's check failed, and says which."""

from __future__ import annotations

import subprocess

from lab.demo_checks import Checks


def test_a_failed_step_makes_the_demo_fail(capsys):
    checks = Checks()
    ok = subprocess.CompletedProcess(["curl"], 0, "hello\n", "")
    bad = subprocess.CompletedProcess(["curl"], 28, "", "curl: (28) Operation timed out\n")
    assert checks.succeeded("allowed call", ok, "hello")
    assert not checks.succeeded("held call completes", bad, "hello")
    assert checks.refused("denied call", bad)
    assert not checks.refused("denied call names the rule", bad, "admin-off-limits")
    assert checks.summary() == 1
    err = capsys.readouterr().err
    assert "2 of 4 checks failed" in err and "held call completes" in err


def test_all_checks_passing_is_the_only_success(capsys):
    checks = Checks()
    checks.expect("one", True)
    assert checks.summary() == 0
    assert "all 1 checks passed" in capsys.readouterr().out
