"""The matrix as tables: one row a kernel and test, then one line a kernel."""

from __future__ import annotations

import re
from pathlib import Path

from vagrant.matrix.runner import Run

BEGIN, END = "<!-- kernel-matrix:begin -->", "<!-- kernel-matrix:end -->"


def _kernel(run: Run) -> str:
    return f"{run.label} ({run.release})" if run.release and run.release != run.label else run.label


def _secs(s: float | None) -> str:
    return "–" if s is None else f"{s:.1f} s"


def detail_table(runs: list[Run]) -> str:
    out = ["| kernel | test | result | time |", "| --- | --- | --- | --- |"]
    for run in runs:
        k = _kernel(run)
        if run.error:
            out.append(f"| {k} | (guest) | ERROR: {run.error.replace('|', '/')} | {_secs(run.wall_seconds)} |")
        for r in run.rows:
            res = r.result if r.result != "pass" or not r.detail else f"pass — {r.detail}"
            if r.result not in ("pass",) and r.detail:
                res = f"{r.result}: {r.detail}"
            out.append(f"| {k} | {r.test} | {res.replace('|', '/')} | {_secs(r.seconds)} |")
    return "\n".join(out)


def summary_table(runs: list[Run]) -> str:
    out = ["| kernel | package | doctor | tests passed | failed | skipped | boot | total | verdict |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        tests = [r for r in run.rows if r.test != "interlock doctor"]
        failed = str(sum(r.result in ("FAIL", "ERROR") for r in tests))
        if tolerated := sum(r.result == "tolerated" for r in tests):
            failed += f" (+{tolerated} tolerated)"
        out.append(f"| {_kernel(run)} | {run.version} | {run.doctor or '–'} | "
                   f"{sum(r.result == 'pass' for r in tests)} | {failed} | {sum(r.result == 'skip' for r in tests)} | "
                   f"{_secs(run.boot_seconds)} | {_secs(run.wall_seconds)} | {'PASS' if run.ok else 'FAIL'} |")
    return "\n".join(out)


def render(runs: list[Run]) -> str:
    return summary_table(runs) + "\n\n" + detail_table(runs) + "\n"


def update_doc(path: Path, runs: list[Run], header: str) -> None:
    """Replace the generated part of the doc (between the markers), keeping the prose around it."""
    block = f"{BEGIN}\n{header}\n\n{render(runs)}{END}"
    text = path.read_text() if path.exists() else f"# Kernels\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
