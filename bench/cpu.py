"""The proxy-CPU columns every benchmark group reports, computed in one place."""

from __future__ import annotations


def cpu_figures(cpu_seconds: float, wall: float, ops: int) -> dict[str, float]:
    """Percent of one core over the run, and microseconds of proxy CPU per operation."""
    return {"proxy_cpu_pct": round(100 * cpu_seconds / wall, 1),
            "proxy_cpu_us_per_op": round(1e6 * cpu_seconds / max(ops, 1), 1)}
