"""What every demo step must have done, checked as the demo goes: `make demo` exits non-zero when
any check failed, so it never prints success over a failed step."""

from __future__ import annotations

import subprocess
import sys


class Checks:
    """The demo's verdicts. `expect` prints one line per check; `summary` says how many failed."""

    def __init__(self) -> None:
        self.passed: list[str] = []
        self.failed: list[str] = []

    def expect(self, what: str, ok: bool, detail: str = "") -> bool:
        mark = "ok  " if ok else "FAIL"
        line = f"  [{mark}] {what}" + ("" if ok or not detail else f": {detail.strip()[-400:]}")
        print(line, flush=True)
        (self.passed if ok else self.failed).append(what)
        return ok

    def succeeded(self, what: str, r: subprocess.CompletedProcess, *needles: str) -> bool:
        """The command exited 0 and printed every needle."""
        out = (r.stdout or "") + (r.stderr or "")
        missing = [n for n in needles if n not in out]
        return self.expect(what, r.returncode == 0 and not missing,
                           f"exit {r.returncode}" + (f", missing {missing!r}" if missing else "") + f"; output: {out}")

    def refused(self, what: str, r: subprocess.CompletedProcess, *needles: str) -> bool:
        """The command failed (non-zero exit) and said every needle."""
        out = (r.stdout or "") + (r.stderr or "")
        missing = [n for n in needles if n not in out]
        return self.expect(what, r.returncode != 0 and not missing,
                           f"exit {r.returncode}" + (f", missing {missing!r}" if missing else "") + f"; output: {out}")

    def summary(self) -> int:
        """0 when every check passed, else 1; printed either way."""
        total = len(self.passed) + len(self.failed)
        if self.failed:
            print(f"\ndemo FAILED: {len(self.failed)} of {total} checks failed:", file=sys.stderr)
            for what in self.failed:
                print(f"  - {what}", file=sys.stderr)
            return 1
        print(f"\ndemo finished: all {total} checks passed")
        return 0


CHECKS = Checks()
