"""Issue 14's target table, printed after every run: each line, its target, what this run
measured, and whether the target is met.

A benchmark module adds its lines with `register(key, label, target, check)`: `check` gets the
run's whole results document (what bench/run.py writes to bench/results/*.json: "results" for
conn/iperf, "postgres", "web", and whatever else a module stored under its own key) and returns
a `Measured`, or None when its group did not run. Lines print in registration order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    value: str  # what the run measured, as printed ("0.31x, 52 us/op")
    met: bool | None  # None: no verdict (a part of the line did not run)


@dataclass(frozen=True)
class Line:
    key: str
    label: str
    target: str
    check: Callable[[dict], Measured | None]


LINES: dict[str, Line] = {}


def register(key: str, label: str, target: str, check: Callable[[dict], Measured | None]) -> None:
    """Add (or replace) a line of the summary."""
    LINES[key] = Line(key, label, target, check)


# ---- helpers for checks ----------------------------------------------------------------------

def ratio(res: dict | None, path: str, base: str = "direct") -> float | None:
    """res[path].value / res[base].value for one benchmark's per-path results."""
    if not res or path not in res or base not in res or not res[base].get("value"):
        return None
    return res[path]["value"] / res[base]["value"]


def us_per_op(res: dict | None, path: str = "interlock") -> float | None:
    return (res or {}).get(path, {}).get("proxy_cpu_us_per_op")


def versus(res: dict | None, rivals: tuple[str, ...], cpu_max: float | None = None,
           factor: float = 1.0) -> Measured | None:
    """Interlock's ratio to direct against the best rival's (times factor), and optionally its
    proxy CPU per operation against cpu_max."""
    mine = ratio(res, "interlock")
    if mine is None:
        return None
    theirs = [r for r in (ratio(res, p) for p in rivals) if r is not None]
    best = max(theirs) if theirs else None
    cpu = us_per_op(res)
    parts = [f"{mine:.2f}x"]
    if best is not None:
        parts.append(f"best rival {best:.2f}x")
    if cpu is not None:
        parts.append(f"{cpu:.0f} us/op")
    met = None if best is None else mine >= best * factor
    if cpu_max is not None:
        met = None if cpu is None or met is None else (met and cpu <= cpu_max)
    return Measured(", ".join(parts), met)


def at_least(res: dict | None, floor: float) -> Measured | None:
    mine = ratio(res, "interlock")
    return None if mine is None else Measured(f"{mine:.2f}x direct", mine >= floor)


# ---- issue 14's lines ----------------------------------------------------------------------------

def _web(doc: dict, key: str) -> dict | None:
    return (doc.get("web") or {}).get(key)


def _pg(doc: dict, key: str) -> dict | None:
    return (doc.get("postgres") or {}).get(key)


def _run(doc: dict, key: str) -> dict | None:
    return (doc.get("results") or {}).get(key)


def _handshakes(doc: dict) -> Measured | None:
    res = _web(doc, "https_hs")
    if not res or "interlock" not in res:
        return None
    mine, theirs = res["interlock"]["value"], res.get("haproxy", {}).get("value")
    cpu = us_per_op(res)
    text = f"{mine:,.0f}/s" + (f" vs haproxy {theirs:,.0f}/s" if theirs else "") + \
        (f", {cpu / 1000:.2f} ms CPU each" if cpu is not None else "")
    met = None if theirs is None or cpu is None else (mine >= theirs and cpu <= 1500)
    return Measured(text, met)


register("http_ka", "HTTP keep-alive, policy + recording", ">= haproxy's ratio; <= 40 us proxy CPU/req",
         lambda d: versus(_web(d, "http_ka"), ("haproxy",), 40))
register("https_ka", "HTTPS keep-alive", ">= haproxy's ratio; <= 60 us/req",
         lambda d: versus(_web(d, "https_ka"), ("haproxy",), 60))
register("https_hs", "TLS handshakes/s", ">= haproxy's rate; <= 1.5 ms CPU each", _handshakes)
register("simple_c8", "pgbench -S simple, 8 clients", ">= max(haproxy, pgbouncer); <= 30 us/stmt",
         lambda d: versus(_pg(d, "simple_c8"), ("haproxy", "pgbouncer"), 30))
register("extended_c8", "pgbench -S extended, 8 clients", ">= max(haproxy, pgbouncer); <= 40 us/stmt",
         lambda d: versus(_pg(d, "extended_c8"), ("haproxy", "pgbouncer"), 40))
register("conn", "new TCP connections/s", ">= haproxy's ratio",
         lambda d: versus(_run(d, "conn"), ("haproxy",)))
register("conn8", "new TCP connections/s, 8 at once", ">= haproxy's ratio (not in the issue: shows workers)",
         lambda d: versus(_run(d, "conn8"), ("haproxy",)))
register("copy", "COPY 2M rows out", ">= 0.9x direct", lambda d: at_least(_pg(d, "copy"), 0.9))
register("iperf", "iperf3 one stream", ">= 0.8x direct", lambda d: at_least(_run(d, "iperf"), 0.8))


def table(doc: dict) -> str:
    """Every registered line: label, target, measured, met / not met / not run."""
    rows = []
    for line in LINES.values():
        try:
            m = line.check(doc)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            m = Measured(f"cannot tell: {type(e).__name__}: {e}", None)
        verdict = "not run" if m is None else {True: "met", False: "NOT MET", None: "-"}[m.met]
        rows.append((line.label, line.target, m.value if m else "-", verdict))
    w = [max(len(r[i]) for r in rows + [("line", "target", "measured", "")]) for i in range(3)]
    head = f"{'line':{w[0]}}  {'target':{w[1]}}  {'measured':{w[2]}}  verdict"
    out = ["issue 14 targets (ratios to direct, same run)", head, "-" * len(head)]
    out += [f"{a:{w[0]}}  {b:{w[1]}}  {c:{w[2]}}  {v}" for a, b, c, v in rows]
    return "\n".join(out)
